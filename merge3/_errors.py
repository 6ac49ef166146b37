"""One exception type for every problem a user can fix: the CLI prints its message on one line and exits 2."""

import re


class Merge3Error(ValueError):
    """Bad input, incompatible models or an invalid config; the message names the problem."""


# pydantic names the member of a union that failed inside the location ('scale.float', 'weight.list[...]'): the user
# wrote 'scale', so those parts are dropped
_UNION_MEMBER = re.compile(r"^(float|int|bool|str|none|[a-z-]+\[.*\])$")


def validation_message(error, where: str) -> str:
    """``where: field 'a.b': message`` for the first problem of a pydantic ``ValidationError``.

    >>> from pydantic import BaseModel, ValidationError
    >>> class Params(BaseModel):
    ...     scale: float | list[float]
    >>> try:
    ...     Params(scale="x")
    ... except ValidationError as e:
    ...     print(validation_message(e, "m.yaml"))
    m.yaml: field 'scale': Input should be a valid number, unable to parse string as a number
    """
    first = error.errors()[0]
    loc = [p for p in first["loc"] if not (isinstance(p, str) and _UNION_MEMBER.match(p))] or first["loc"]
    field = ".".join(str(p) for p in loc) or "(top level)"
    return f"{where}: field '{field}': {first['msg'].removeprefix('Value error, ')}"
