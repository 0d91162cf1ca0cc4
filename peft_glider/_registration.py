"""Registers GLIDER as a PEFT method.

PEFT has no plugin mechanism: `register_peft_method` only accepts names that are already members of the
`PeftType` enum. We therefore add the member in place (keeping enum identity, so `PeftType("GLIDER")`,
`.value` and `is` comparisons inside PEFT keep working), then register our config and tuner classes.
Both steps are idempotent and become no-ops once PEFT ships the member itself.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

GLIDER_NAME = "GLIDER"


def _add_peft_type_member(name: str) -> PeftType:
    """Return `PeftType[name]`, adding the member to the enum in place if it is missing."""
    existing = PeftType._value2member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    if hasattr(type(PeftType), "_add_member_"):  # Python >= 3.13 keeps members as descriptors
        PeftType._add_member_(name, member)
    else:
        type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


def register(config_cls: type, model_cls: type) -> PeftType:
    """Make `PeftType.GLIDER` exist and map it to the config and tuner classes (idempotent).

    Called by the package's `__init__` with `GliderConfig` and `GliderModel`, the way PEFT's own tuners register
    in theirs; this module imports neither, so registration, config and model form no import circle.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = _add_peft_type_member(GLIDER_NAME)
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=GLIDER_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix="glider_")
    return peft_type


GLIDER_PEFT_TYPE = _add_peft_type_member(GLIDER_NAME)  # configs need the member before the method is registered
