"""Launchers: run the trainer on localhost, or print Kubernetes TFJob and Slurm sbatch job files."""
