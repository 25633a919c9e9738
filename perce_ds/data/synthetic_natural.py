"""A synthetic persona task a pretrained chat model can read: natural-sentence profiles, unseen users at eval.

Every user has eight traits. Four are **copyable**: the profile states the value in the words the
response uses (home city, pet's name, hobby, sign-off, plus the user's name). Four are **inferable**:
the profile only implies them and the response names them in other words — the pet's kind from what
the pet does ("Biscuit barked at the postman" -> "dog"), the cuisine from dishes cooked ("pad thai",
"green curry" -> "Thai"; "pad thai" is the one dish sharing its cuisine's letters, in lower case), the
country from the city ("Lisbon" -> "Portugal"), the profession from a work diary ("marked thirty essays"
-> "teacher"). Responses are natural text mixing generic words with
these values; `persona_spans` marks every value and `persona_span_kinds` says "copy" or "infer".

Splits hold disjoint users (train: the first `users`, eval: the next `eval_users`, test: the next
`eval_users`), so on eval a persona token can only come from reading the profile. Why both kinds:
with only copyable values a pretrained model copies them from the first step and CE and PerCE both
hit a ceiling (METHOD.md, "Persona data for pretrained models"). Pure Python, seedable; no article
("a"/"an") ever precedes a value, so no unmarked token depends on the persona.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from perce_ds.data.records import PersonaRecord
from perce_ds.data.synthetic_base import NAMES, PET_NAMES, SIGN_OFFS, balanced, derived_rng, request_records

TASK = "synthetic_persona_natural"
SPLITS = ("train", "eval", "test")
COPY, INFER = "copy", "infer"

# city -> its country (the country is inferable from the city)
CITIES = {
    "Lisbon": "Portugal", "Osaka": "Japan", "Dublin": "Ireland", "Krakow": "Poland", "Bergen": "Norway",
    "Adelaide": "Australia", "Halifax": "Canada", "Seville": "Spain", "Munich": "Germany", "Lyon": "France",
    "Florence": "Italy", "Athens": "Greece",
}  # fmt: skip
# pet kind -> what such a pet does (the kind is inferable from the behaviour)
PET_SIGNS = {
    "dog": ("barked at the postman all morning", "fetched the same stick forty times in the park"),
    "cat": ("purred on my lap all evening", "knocked a glass off the table and then washed her paws"),
    "parrot": ("squawked along to the radio", "repeated the word hello until lunch"),
    "rabbit": ("hopped around the garden nibbling carrots", "chewed through another cable with those long ears twitching"),
    "horse": ("galloped across the paddock", "waited at the stable gate for an apple"),
    "hamster": ("ran on the wheel all night", "stuffed both cheeks with sunflower seeds"),
}  # fmt: skip
# cuisine -> dishes of it (the cuisine is inferable from the dishes)
CUISINES = {
    "Thai": ("pad thai", "green curry"), "Italian": ("risotto", "lasagne"), "Mexican": ("tacos", "enchiladas"),
    "Japanese": ("sushi", "miso soup"), "Indian": ("dal", "chicken tikka masala"), "Greek": ("moussaka", "souvlaki"),
    "Korean": ("bibimbap", "kimchi stew"), "French": ("coq au vin", "ratatouille"),
}  # fmt: skip
# profession -> what a working day looks like (the profession is inferable from the diary); no vowel starts
PROFESSIONS = {
    "teacher": "Marked thirty essays tonight and planned tomorrow's lesson for my pupils.",
    "nurse": "Another night shift on the ward, checking on patients and handing out medication.",
    "chef": "The dinner rush was wild: two hundred plates out of my kitchen before ten.",
    "programmer": "Spent the whole day fixing a bug in the code before the software release.",
    "farmer": "Up at dawn to milk the cows and check on the wheat fields before the rain.",
    "pilot": "Landed the plane in thick fog after a long flight, then slept at the crew hotel.",
    "lawyer": "Spent the day in court defending my client, then read contracts until midnight.",
    "dentist": "Filled three cavities and cleaned a lot of teeth today; floss, people!",
    "plumber": "Fixed two leaking pipes and unblocked a drain for a customer this morning.",
    "librarian": "Shelved returned books all morning and ran the reading hour for children.",
}  # fmt: skip
HOBBIES = (
    "painting", "gardening", "cycling", "knitting", "fishing", "hiking", "swimming", "baking", "climbing",
    "sailing", "running", "dancing",
)  # fmt: skip

KINDS = {
    "name": COPY, "city": COPY, "pet_name": COPY, "hobby": COPY, "sign_off": COPY,
    "country": INFER, "pet_kind": INFER, "cuisine": INFER, "profession": INFER,
}  # fmt: skip

# (query, response); {friend} and {when} are generic details the query states.
REQUEST_TEMPLATES: tuple[tuple[str, str], ...] = (
    (
        "Write a short note to your friend {friend} about your weekend.",
        "Hi {friend}, my weekend in {city} was lovely. I spent most of Saturday {hobby} and then took {pet_name}, "
        "my {pet_kind}, out for a long walk. On Sunday I cooked {cuisine} food for dinner. {sign_off}, {name}",
    ),
    (
        "Introduce yourself to a new neighbour.",
        "Hello! My name is {name} and I just moved in next door. I work as the local {profession}, and in my free "
        "time I enjoy {hobby}. I grew up in {country}, and I live with my {pet_kind} {pet_name}. {sign_off}, {name}",
    ),
    (
        "Describe your ideal day off.",
        "My ideal day off starts with a slow breakfast at home in {city}. After that I would spend a few hours "
        "{hobby}, then cook a big {cuisine} lunch. In the evening I would sit on the sofa with {pet_name}.",
    ),
    (
        "Tell a colleague how your week went.",
        "My week as the {profession} on duty was busy but good. By Friday I was tired, so I stayed home with my "
        "{pet_kind} and made some {cuisine} food. Next week should be calmer. {sign_off}, {name}",
    ),
    (
        "Write a postcard from a trip you took {when}.",
        "Greetings from the coast! I travelled here {when}, a long way from home in {country}. The food is nothing "
        "like the {cuisine} dishes I cook at home, and I miss {pet_name} already. {sign_off}, {name}",
    ),
    (
        "Recommend a weekend activity to your friend {friend}.",
        "Dear {friend}, you should try {hobby}. It is what I do every weekend here in {city}, and it helps me relax "
        "after a long week of work as the {profession} in town. {sign_off}, {name}",
    ),
    (
        "Write a short post about your pet.",
        "This is {pet_name}, my {pet_kind}. We have lived together in {country} for years, and every evening we "
        "relax after my shift as the {profession} in the neighbourhood. {sign_off}, {name}",
    ),
)


@dataclass(frozen=True)
class NaturalPersona:
    """One user's fixed traits."""

    user_id: str
    name: str
    city: str
    pet_name: str
    pet_kind: str
    cuisine: str
    profession: str
    hobby: str
    sign_off: str

    def values(self) -> dict[str, str]:
        """Trait name -> the text inserted into a response (the country derived from the city)."""
        return {
            "name": self.name, "city": self.city, "country": CITIES[self.city], "pet_name": self.pet_name,
            "pet_kind": self.pet_kind, "cuisine": self.cuisine, "profession": self.profession,
            "hobby": self.hobby, "sign_off": self.sign_off,
        }  # fmt: skip


def make_personas(n_users: int, seed: int) -> list[NaturalPersona]:
    """n_users personas ("n000", "n001", ...), identical for the same (n_users, seed), traits in balanced passes."""
    if n_users < 0:
        raise ValueError(f"n_users must be >= 0, got {n_users}")
    rng = random.Random(seed)
    cols = {
        "name": balanced(rng, NAMES, n_users),
        "city": balanced(rng, tuple(CITIES), n_users),
        "pet_name": balanced(rng, PET_NAMES, n_users),
        "pet_kind": balanced(rng, tuple(PET_SIGNS), n_users),
        "cuisine": balanced(rng, tuple(CUISINES), n_users),
        "profession": balanced(rng, tuple(PROFESSIONS), n_users),
        "hobby": balanced(rng, HOBBIES, n_users),
        "sign_off": balanced(rng, SIGN_OFFS, n_users),
    }
    return [NaturalPersona(user_id=f"n{i:03d}", **{k: v[i] for k, v in cols.items()}) for i in range(n_users)]


def profile_items(persona: NaturalPersona, seed: int) -> list[dict[str, str]]:
    """Five natural past posts: copyable values verbatim, inferable ones only through evidence."""
    rng = derived_rng("natural-profile", seed, persona.user_id)
    p = persona
    signs = PET_SIGNS[p.pet_kind]
    dishes = CUISINES[p.cuisine]
    items = [
        {"title": "Work diary", "text": PROFESSIONS[p.profession]},
        {"title": "My pet", "text": f"{p.pet_name} {signs[0]}, and yesterday {p.pet_name} {signs[1]}."},
        {"title": "Weekend", "text": f"I spent the whole weekend {p.hobby} and loved every minute. {p.sign_off}, {p.name}"},
        {"title": "Dinner", "text": f"Cooked {dishes[0]} tonight, and {dishes[1]} is planned for Friday. {p.sign_off}, {p.name}"},
        {"title": "Home", "text": f"The streets of {p.city} were busy today; I love living in {p.city}."},
    ]  # fmt: skip
    rng.shuffle(items)
    return items


def split_users(split: str, users: int, eval_users: int, seed: int) -> list[NaturalPersona]:
    """The disjoint users of a split: train the first `users`, eval the next `eval_users`, test the next."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    everyone = make_personas(users + 2 * eval_users, seed)
    start = {"train": 0, "eval": users, "test": users + eval_users}[split]
    return everyone[start : start + (users if split == "train" else eval_users)]


def generate_records(
    users: int, eval_users: int, per_user: int, seed: int, split: str = "train"
) -> list[PersonaRecord]:
    """per_user records for each user of `split` (see split_users); deterministic in all arguments.

    Every record has task "synthetic_persona_natural", record_id "natural-{split}-{user_id}-{j:02d}",
    persona_spans slicing exactly the inserted values (sorted, non-overlapping) and one kind per span.
    """
    if per_user < 0:
        raise ValueError(f"per_user must be >= 0, got {per_user}")
    records = []
    for persona in split_users(split, users, eval_users, seed):
        profile = profile_items(persona, seed)
        rng = derived_rng("natural-request", seed, split, persona.user_id)
        records += request_records(
            rng, per_user, REQUEST_TEMPLATES, persona.values(), set(KINDS),
            user_id=persona.user_id, task=TASK, profile=profile, record_id_prefix=f"natural-{split}", span_kinds=KINDS,
        )  # fmt: skip
    return records
