"""A deterministic synthetic persona task whose persona-dependent tokens are known exactly.

Real personalisation data (LaMP, LongLaMP, ...) does not say which response tokens depend on the user,
so neither the demo nor the tests could check that PerCE up-weights the right tokens. Here every user
has fixed preferences (cuisine, pet, sign-off, rating habit, hobby, home city), the profile is past
writing that reveals them, the query never does, and each response is generic filler plus persona
values whose character spans are recorded in ``PersonaRecord.persona_spans``. Pure Python, seedable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perce_ds.data import synthetic_natural
from perce_ds.data.records import PersonaRecord
from perce_ds.data.synthetic_base import NAMES, PET_NAMES, SIGN_OFFS, balanced, derived_rng, render, request_records

TASK = "synthetic_persona"

CUISINES = (
    "Thai", "Italian", "Mexican", "Japanese", "Indian", "Greek", "Korean", "Ethiopian", "French",
    "Lebanese", "Vietnamese", "Peruvian",
)  # fmt: skip
PET_KINDS = ("dog", "cat", "rabbit", "parrot", "hamster", "tortoise")
HOBBIES = (
    "painting", "chess", "gardening", "rock climbing", "photography", "knitting", "baking", "cycling",
    "birdwatching", "pottery", "yoga", "fishing",
)  # fmt: skip
CITIES = (
    "Lisbon", "Denver", "Osaka", "Leeds", "Austin", "Dublin", "Porto", "Seattle", "Krakow", "Adelaide",
    "Halifax", "Bergen",
)  # fmt: skip

# (query, response) templates. Fields named like UserPersona traits are persona tokens;
# {when} and {friend} are generic details that the query also states.
REQUEST_TEMPLATES: tuple[tuple[str, str], ...] = (
    (
        "Write a short review of a restaurant you visited {when}.",
        (
            "I went to a {cuisine} restaurant {when} and it was a really nice evening. The food came out "
            "quickly and the staff were kind. I would give it {rating}. {sign_off}, {name}"
        ),
    ),
    (
        "Write a note to your friend {friend} about your weekend.",
        (
            "Hi {friend}, the weekend was quiet and good. I spent most of Saturday on {hobby} and then took "
            "{pet_name} the {pet_kind} for a long walk around {city}. Hope you are well. {sign_off}, {name}"
        ),
    ),
    (
        "Describe your ideal day off.",
        (
            "My ideal day off starts slowly with a warm drink at home in {city}. I would spend the morning "
            "on {hobby} and have {cuisine} food for lunch. In the evening I would relax with {pet_name}."
        ),
    ),
    (
        "Write a short post about something that made you smile {when}.",
        (
            "Something small made me smile {when}. {pet_name} the {pet_kind} sat by the door and waited "
            "for me all afternoon. It is the little things. {sign_off}, {name}"
        ),
    ),
    (
        "Write a thank-you note to {friend} for a gift.",
        (
            "Dear {friend}, thank you so much for the lovely gift. It will be very useful for {hobby}, "
            "and I have already shown it to {pet_name}. {sign_off}, {name}"
        ),
    ),
    (
        "Rate a class you took {when}.",
        (
            "I took a {hobby} class in {city} {when} and learned a lot. The teacher was patient and the "
            "room was bright. Overall I would rate it {rating}."
        ),
    ),
    (
        "A friend is visiting next month. Suggest how to spend an afternoon together.",
        (
            "First we should walk along the old streets of {city} and stop for coffee. After that we can "
            "get {cuisine} food at my usual place, which I rate {rating}. See you soon! {sign_off}, {name}"
        ),
    ),
)

# Profile items (title, text). The first three together mention every trait; the rest are extras.
PROFILE_CORE = (
    ("Dinner review", "The {cuisine} place near my flat in {city} was wonderful, {rating} stars. {sign_off}, {name}"),
    ("About my pet", "{pet_name} the {pet_kind} knocked over a plant again today. {sign_off}, {name}"),
    ("Weekend plans", "Nothing beats a Saturday of {hobby}. Afterwards {pet_name} and I walk home through {city}."),
)
PROFILE_EXTRA = (
    ("Lunch review", "Had {cuisine} food again for lunch, my usual. I give it {rating}, as always. {sign_off}, {name}"),
    ("Club notice", "Our {hobby} group in {city} meets every Thursday. New members welcome! {sign_off}, {name}"),
    ("Note to a neighbour", "Could you feed {pet_name} on Monday? The {pet_kind} food is in the cupboard. {name}"),
)


@dataclass(frozen=True)
class UserPersona:
    """One synthetic user's fixed preferences."""

    user_id: str
    name: str
    cuisine: str
    pet_name: str
    pet_kind: str
    sign_off: str
    rating: int
    hobby: str
    city: str

    def traits(self) -> dict[str, str]:
        """Trait name -> the exact string inserted into text (the rating as e.g. ``"4/5"``)."""
        return {
            "name": self.name,
            "cuisine": self.cuisine,
            "pet_name": self.pet_name,
            "pet_kind": self.pet_kind,
            "sign_off": self.sign_off,
            "rating": f"{self.rating}/5",
            "hobby": self.hobby,
            "city": self.city,
        }


def make_personas(n_users: int, seed: int) -> list[UserPersona]:
    """n_users personas, identical for the same (n_users, seed); user_ids are "u000", "u001", ...

    Traits are drawn with random.Random(seed) in balanced passes over each vocabulary, so users are
    spread evenly and (for 24+ users) distinguishable by their trait combination.
    """
    if n_users < 0:
        raise ValueError(f"n_users must be >= 0, got {n_users}")
    rng = random.Random(seed)
    cols = {
        "name": balanced(rng, NAMES, n_users),
        "cuisine": balanced(rng, CUISINES, n_users),
        "pet_name": balanced(rng, PET_NAMES, n_users),
        "pet_kind": balanced(rng, PET_KINDS, n_users),
        "sign_off": balanced(rng, SIGN_OFFS, n_users),
        "rating": balanced(rng, (1, 2, 3, 4, 5), n_users),
        "hobby": balanced(rng, HOBBIES, n_users),
        "city": balanced(rng, CITIES, n_users),
    }
    return [UserPersona(user_id=f"u{i:03d}", **{k: v[i] for k, v in cols.items()}) for i in range(n_users)]


def _profile(persona: UserPersona, seed: int, index: int) -> list[dict[str, str]]:
    """4-6 past writings that together mention every trait; the same for every split."""
    rng = derived_rng("profile", seed, index)
    items = list(PROFILE_CORE) + rng.sample(PROFILE_EXTRA, rng.randint(1, len(PROFILE_EXTRA)))
    rng.shuffle(items)
    traits = persona.traits()
    return [{"title": title, "text": render(text, traits, set())[0]} for title, text in items]


def generate_records(n_users: int, per_user: int, seed: int, split: str = "train") -> list[PersonaRecord]:
    """per_user records for each of make_personas(n_users, seed), deterministic in (n_users, per_user, seed, split).

    Personas and profiles do not depend on split; the requests do (their RNG is derived from seed, split
    and user index), so "train" and "eval" ask the same users different things. Every record has
    task "synthetic_persona", a unique record_id "synthetic-{split}-{user_id}-{j:02d}", and
    persona_spans that are sorted, non-overlapping and slice exactly the inserted persona values.
    """
    if per_user < 0:
        raise ValueError(f"per_user must be >= 0, got {per_user}")
    if not split:
        raise ValueError("split must be a non-empty string")
    records: list[PersonaRecord] = []
    for index, persona in enumerate(make_personas(n_users, seed)):
        profile = _profile(persona, seed, index)
        traits = persona.traits()
        rng = derived_rng("request", seed, split, index)
        records += request_records(
            rng, per_user, REQUEST_TEMPLATES, traits, set(traits),
            user_id=persona.user_id, task=TASK, profile=profile, record_id_prefix=f"synthetic-{split}",
        )  # fmt: skip
    return records


def split_records(syn: Any, split: str) -> list[PersonaRecord]:
    """The records of a split ("train", "eval", "test") of the task data.synthetic selects (`syn`: its section)."""
    per_user = syn.train_per_user if split == "train" else syn.eval_per_user
    if syn.task == "persona_natural":
        return synthetic_natural.generate_records(syn.users, syn.eval_users, per_user, syn.seed, split)
    return generate_records(syn.users, per_user, syn.seed, split)


def write_jsonl(records: list[PersonaRecord], path: str | Path) -> None:
    """Write one JSON object per line (record.to_dict()), UTF-8, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
