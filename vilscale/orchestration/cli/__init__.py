"""The `vilscale` subcommands of the top layer, one small module each (argument parsing and the one
call into `launch`, `training` or `checkpoint`): train, submit, eval, export, report, demo."""
