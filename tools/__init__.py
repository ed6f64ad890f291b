"""Commands that orchestrate the toolkit's parts (training, export, runtime) from outside them; see gpu_check.py."""
