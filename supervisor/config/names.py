"""The names nnU-Net takes (dataset, configuration, trainer, plans) and other words that leave this program.

How it works: each check returns what was expected, or None when the value is fine (schema.py's bounds).
nnU-Net uses these names as parts of folder and file names (`nnUNet_results/<dataset>/<trainer>__<plans>__
<configuration>`, `<plans>.json`) and as words of nnUNetv2_train's argv, and it finds the trainer as a
Python class by its name. So a name is ASCII letters, digits and `_ - . +`, not starting with `-` (it would
read as an option) or `.`; the trainer is a Python identifier; a dataset is such a name or its numeric id.
What is refused can never be a shell word, a path or a line of its own: `slurm-script` writes these names
into a script, the logs and notifications print them. Control characters (a newline would end an #SBATCH
block, a log line or a comment) are named first, with their own message, in every string key that is a
name or a path (`no_control`); `[environment]` values stay verbatim (they go to the trainer's environment
and never into a script).
"""
from __future__ import annotations

import keyword
import re

NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]*")
NAME_RULE = 'ASCII letters, digits, "_", "-", "." and "+", not starting with "-" or "."'


def control_chars(v: str) -> str | None:
    """What a string key may not hold: NUL bytes and other control characters (newline, CR, tab, ESC...)."""
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in v):
        return "a string without NUL bytes or other control characters (newline, tab, ...)"
    return None


def no_control(v: str) -> str | None:
    """A non-empty string without control characters (paths, file names, credential names)."""
    return control_chars(v) or (None if v.strip() else "a non-empty string")


def name(v: str) -> str | None:
    """A configuration or plans name (`3d_fullres`, `nnUNetResEncUNetMPlans`)."""
    if (why := control_chars(v)) is not None:
        return why
    return None if NAME.fullmatch(v) else f"a name of {NAME_RULE}"


def trainer(v: str) -> str | None:
    """The trainer: a Python class name, as nnU-Net looks it up (`nnUNetTrainer_250epochs`)."""
    if (why := control_chars(v)) is not None:
        return why
    ok = v.isascii() and v.isidentifier() and not keyword.iskeyword(v)
    return None if ok else "a Python class name (ASCII letters, digits and \"_\", not starting with a digit)"


def dataset(v) -> str | None:
    """`Dataset001_CardiacSeg` (a name as above) or the numeric id (an integer >= 0, or its digits)."""
    if isinstance(v, int):
        return None if v >= 0 else "a dataset name or its numeric id (an integer >= 0)"
    if (why := control_chars(v)) is not None:
        return why
    return None if NAME.fullmatch(v) else f'a dataset name like "Dataset001_CardiacSeg" ({NAME_RULE}) or its id'


def name_list(v) -> str | None:
    """A list of configuration names."""
    if not all(isinstance(x, str) for x in v):
        return "a list of strings"
    return next((why for why in map(name, v) if why), None)
