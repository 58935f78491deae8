"""Runnable examples of the Task API (see README "Bring your own task")."""
