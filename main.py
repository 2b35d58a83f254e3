"""Entry point: python main.py {fit,validate,test} --config configs/... [--section.key value ...]

See classification/cli.py, README.md and docs/command_line.md.
"""
from classification.cli import cli_main

if __name__ == "__main__":
    cli_main()
