"""One module per `dalle` subcommand: a typed function whose signature is its command line.

These modules import only typer and the standard library at the top, so `dalle --help` stays instant;
the work happens in the library modules they import inside the function.
"""
