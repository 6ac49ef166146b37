"""One base for every user-facing config (search spaces, item banks, merge configs): strict, frozen, finite.

Unknown fields are refused with their name (a typo never silently does nothing), every number must be finite, and a
validated config cannot be changed afterwards (what was checked is what runs). ``validation_message`` turns pydantic's
error into merge3's one line that names the field.
"""

from collections.abc import Hashable, Iterable
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


def _not_a_boolean(value):
    if isinstance(value, bool):  # YAML's yes/true would otherwise be seed 1
        raise ValueError(f"Input should be an integer, not {str(value).lower()}")
    return value


MAX_SEED = 2**32 - 1  # what numpy's RandomState, scikit-learn and torch's generators all take
Seed = Annotated[int, BeforeValidator(_not_a_boolean), Field(ge=0, le=MAX_SEED)]
# The most candidates one generation (or one calibration) builds: a typo such as 10**30 would otherwise fill memory
# with genomes before anything is evaluated. pymoo and Optuna populations are tens to thousands.
MAX_CANDIDATES = 100_000


def first_repeat(values: Iterable[Hashable]) -> Hashable | None:
    """The first value that comes a second time in ``values``, or None: for "'x' is listed twice" messages.

    >>> first_repeat(["a", "b", "a"]), first_repeat([1, 2])
    ('a', None)
    """
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _no_repeats(values: list) -> list:
    twice = first_repeat(values)
    if twice is not None:
        raise ValueError(f"'{twice}' is listed twice")
    return values


NoRepeats = AfterValidator(_no_repeats)
"""A list field whose entries must be distinct: ``tasks: Annotated[list[str], NoRepeats]``."""


class StrictConfig(BaseModel):
    """A frozen pydantic model that forbids unknown fields and non-finite numbers.

    >>> class Engine(StrictConfig):
    ...     population: int = 8
    >>> Engine(population=4).population
    4
    >>> try:
    ...     Engine(populaton=4)
    ... except ValueError as e:
    ...     print(e.errors()[0]["type"])
    extra_forbidden
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


__all__ = ["MAX_CANDIDATES", "MAX_SEED", "NoRepeats", "Seed", "StrictConfig", "first_repeat"]
