"""bench.machine: what every bench figure records about the CPU (no timing)."""

from bench import machine, report

# Trimmed /proc/cpuinfo of the two CPU kinds these machines were seen on.
INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
AMD = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu fma sse4_2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni
"""


def test_parse_cpuinfo_picks_model_and_tf_relevant_flags():
  intel = machine.parse_cpuinfo(INTEL)
  assert intel["cpu"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
  assert intel["flags"] == ["avx2", "fma", "avx512f", "avx512_vnni",
                            "avx512_bf16", "avx512_fp16", "amx_tile",
                            "amx_bf16", "amx_int8"]
  assert intel["processors_listed"] == 2
  amd = machine.parse_cpuinfo(AMD)
  assert amd["cpu"] == "AMD EPYC"
  # avx512dq is not a flag TF picks kernels by; no AMX on this one.
  assert amd["flags"] == ["avx2", "fma", "avx512f", "avx512_vnni",
                          "avx512_bf16"]
  assert machine.parse_cpuinfo("") == {"cpu": "unknown CPU", "flags": [],
                                       "processors_listed": 0}


def test_header_names_cpu_flags_cores_and_load():
  m = {**machine.parse_cpuinfo(INTEL), "cpus": 2, "cpus_usable": 1,
       "load": [0.5, 1.25, 2.0]}
  line = machine.header(m)
  assert line == ("machine: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, "
                  "2 CPUs (1 usable), flags: avx2 fma avx512f avx512_vnni "
                  "avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8, "
                  "load avg (1/5/15 min) 0.50/1.25/2.00")


def test_info_reads_this_machine():
  m = machine.info()
  assert m["cpus"] >= 1 and 1 <= m["cpus_usable"] <= m["cpus"]
  assert m["load"] is None or (len(m["load"]) == 3 and
                               all(x >= 0 for x in m["load"]))
  assert set(m["flags"]) <= set(machine.TF_FLAGS)


def test_bench_run_report_header_carries_the_machine():
  m = {**machine.parse_cpuinfo(AMD), "cpus": 2, "cpus_usable": 2,
       "load": [1.0, 2.0, 3.0], "load_start": [0.1, 0.2, 0.3],
       "tensorflow": "2.21.0", "keras": "3.15.1", "python": "3.11.7"}
  data = {"run": {"started": "now", "duration_s": 1, "mode": "test",
                  "repeats": 1, "min_seconds": 5, "min_intervals": 3,
                  "warmup_intervals": 2, "machine": m},
          "rows": [], "goals": []}
  text = report.terminal(data)
  assert ("machine: AMD EPYC, 2 CPUs, flags: avx2 fma avx512f avx512_vnni "
          "avx512_bf16, load avg (1/5/15 min) 1.00/2.00/3.00 (at start "
          "0.10/0.20/0.30)") in text
  assert "TF 2.21.0, Keras 3.15.1" in text
  assert "machine: AMD EPYC" in report.markdown(data)
