"""`higgs-tune ui`: a local web UI over the library calls the CLI makes.

server.py   the HTTP server (standard library only) and its JSON API
service.py  what each button does: presets and config validation, inspect, run status,
            generation, export (the same library functions the CLI calls)
jobs.py     background jobs (`higgs-tune prepare` / `higgs-tune train` as subprocesses,
            one per output folder, stop = SIGINT)
paths.py    every path a request names is confined to the folders the user chose
static/     the one page (HTML + JS + CSS), nothing fetched from the network
"""
