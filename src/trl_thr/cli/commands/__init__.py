"""One module per `trl-thr` subcommand (`train`, `eval`, `analyze`): parse the arguments, then call the libraries
of `trl_thr.cli` and the core."""
