"""Command groups of `moonpipe`, one module per area (index, creatives, training, ...).

Each module defines `register(add)`, where `add(name, handler, help_text)` creates a top-level
command and returns its argparse parser. `moonpipe.cli` discovers the modules here, so an area adds
its commands without touching the others. Modules here import only argparse-level things at module
level: `moonpipe --help` must stay instant.
"""
