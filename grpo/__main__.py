"""`python -m grpo sft|grpo|evaluate --config run.yaml [--set key=value ...]` (grpo/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
