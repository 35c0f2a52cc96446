"""Settings named the way a user sets them: a settings error says `--max-batch-size
(DOCKER_VIT_MAX_BATCH_SIZE)`, not the field `max_batch_size`, and the Runpod worker, which has no
flags, names the variable where a shared message names a flag.
"""

from __future__ import annotations

import re

from docker_vit.config import env_name, flag_name, options


def named(exc: Exception, flags: bool = True) -> str:
    """A settings error with the flag and variable a user sets (or the variable alone, where there
    are no flags) in place of each setting's name: the first word, and any name with an underscore."""

    def user_name(match: re.Match) -> str:
        name = match.group(0)
        if name not in options():
            return name
        return f"{flag_name(name)} ({env_name(name)})" if flags else env_name(name)

    # not an attribute (`MyHandler.max_batch_size`): only settings named on their own
    text = re.sub(r"^[a-z]+\b|(?<!\.)\b[a-z]+(?:_[a-z]+)+\b", user_name, str(exc))
    return text if flags else _unflagged(text)


def _unflagged(text: str) -> str:
    """A settings message's flags (`send a key with --api-key instead`) as the variables they set, for
    the Runpod worker, which has none."""

    def setting(match: re.Match) -> str:
        name = match.group(0)[2:].replace("-", "_")
        return env_name(name) if name in options() and flag_name(name) == match.group(0) else match.group(0)

    return re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", setting, text)
