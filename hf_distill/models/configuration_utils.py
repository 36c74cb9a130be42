"""What the student configurations share: checks of their named entries and of their input normalization."""


def check_named_entries(entries, kind: str, required: tuple[str, ...] = ()) -> list[dict]:
    """`entries` (mappings with a `name`: the teachers of a UNIC student, the domains of a UDON model) as a list of
    dicts, checked: every entry has a non-empty string name without `.` (names key the heads' modules) and the
    `required` keys, and no two share a name. `kind` names an entry in the errors."""
    entries = [dict(entry) for entry in (entries or [])]
    for entry in entries:
        name = entry.get("name")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{kind} {entry} needs a non-empty string name without '.'.")
        missing = sorted(set(required) - set(entry))
        if missing:
            raise ValueError(f"{kind} {entry} lacks {missing}.")
    names = [entry["name"] for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} names must be unique, got {names}.")
    return entries


def normalization_lists(image_mean, image_std) -> tuple[list[float], list[float]]:
    """A student's input normalization (per-channel mean and std) as lists of floats, as its `config.json` holds it."""
    return [float(value) for value in image_mean], [float(value) for value in image_std]
