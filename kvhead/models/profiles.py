"""Where head profiles live and how the right one is found for a model.

Profiles shipped with kvhead (``kvhead/profiles/*.json``) and those written by ``kvhead
profile`` into ``$KVHEAD_HOME/profiles`` are matched to a model by fingerprint, so a profile is
never applied to a model it was not measured on.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kvhead.core.stability import HeadProfile, model_fingerprint
from kvhead.models.store import kvhead_home


class ProfileError(ValueError):
    """A head profile is missing, unreadable or belongs to another model."""


def user_profile_dir() -> Path:
    return kvhead_home() / "profiles"


def _candidates() -> list[Path]:
    shipped = resources.files("kvhead") / "profiles"
    paths = (
        [Path(str(p)) for p in shipped.iterdir() if p.name.endswith(".json")]
        if shipped.is_dir()
        else []
    )
    user = user_profile_dir()
    return paths + (sorted(user.glob("*.json")) if user.is_dir() else [])


def load_profile(path: str | Path) -> HeadProfile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"head profile {path} does not exist")
    try:
        return HeadProfile.load(path)
    except ValueError as err:  # pydantic.ValidationError is a ValueError
        raise ProfileError(f"head profile {path} is not a valid kvhead profile: {err}") from None


def profile_for_model(model_dir: str | Path, path: str | Path | None = None) -> HeadProfile:
    """The profile at ``path`` (checked against the model), or the newest matching one known."""
    fingerprint = model_fingerprint(model_dir)
    if path is not None:
        profile = load_profile(path)
        if profile.model_fingerprint != fingerprint:
            raise ProfileError(
                f"head profile {path} was measured on model {profile.model_fingerprint}, "
                f"not on {model_dir} ({fingerprint})"
            )
        return profile
    for candidate in reversed(_candidates()):
        try:
            profile = HeadProfile.load(candidate)
        except ValueError:
            continue
        if profile.model_fingerprint == fingerprint:
            return profile
    raise ProfileError(
        f"no head profile for {model_dir} (fingerprint {fingerprint}); run `kvhead profile` first"
    )
