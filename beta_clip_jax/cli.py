"""Running a command in this process (tests, notebooks) with the flags `python -m` would parse.

Commands on absl define their flags into the FlagValues they are given (`define_flags`) and read
them from it in `main(argv, flag_values)`. `run_command` gives each call fresh flag values, so
calls neither redefine nor share absl's global flags, which other commands' flags of the same
names (--out, --text, --model) live in.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from absl import flags


def run_command(command: ModuleType, args: Sequence[str]):
    """`command.main` on `args` (flags as on the command line, no program name); returns what
    main returns. Flag errors raise absl's flags.Error, as the command line reports them."""
    flag_values = flags.FlagValues()
    command.define_flags(flag_values)
    argv = flag_values([command.__name__, *args])
    return command.main(argv, flag_values)
