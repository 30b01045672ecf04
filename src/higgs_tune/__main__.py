"""`python -m higgs_tune` = the higgs-tune command."""

from higgs_tune.cli import main

main()
