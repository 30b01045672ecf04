"""One module per area of `higgs-tune` subcommands: data, model, train, infer."""
