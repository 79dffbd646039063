"""The base of every recipe section: strict scalar types and a frozen pydantic model that refuses
unknown and renamed keys (online_dpo/config/recipe.py builds the recipe from it)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, model_validator
from pydantic_core import PydanticCustomError


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):  # lax float would read true as 1.0
        raise PydanticCustomError("float_type", "expected a number")
    return value


# YAML reads 1e-5 as a string: floats take numeric strings (lax). Ints, bools and strings are
# strict: a bool is not an int, 2.5 is not an int, "yes" is not a bool.
Float = Annotated[float, BeforeValidator(_refuse_bool)]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


class Section(BaseModel):
    """Frozen, no extra keys, docstrings as field descriptions, no inf/nan floats."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True,
                              allow_inf_nan=False)
    RENAMED: ClassVar[dict[str, str]] = {}
    """Old key -> its new dotted name; an old key is refused with a message naming the new one."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in cls.RENAMED:
                    raise PydanticCustomError("renamed", "{old} was renamed {new}", {"old": key, "new": cls.RENAMED[key]})
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                raise PydanticCustomError("unknown_key", "unknown key {key}",
                                          {"key": unknown[0], "known": ", ".join(sorted(cls.model_fields))})
        return data
