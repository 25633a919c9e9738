"""A synthetic persona task a pretrained chat model can read: natural-sentence profiles, unseen users at eval.

Every user has eight traits. Four are **copyable**: the profile states the value in the words the
response uses (home city, pet's name, hobby, sign-off, plus the user's name). Four are **inferable**:
the profile only implies them and the response names them in other words — the country from the city
("Lisbon" -> "Portugal"), the pet's kind from what the pet does ("Biscuit barked at the postman" ->
"dog"), the cuisine from a dish ("tom yum soup" -> "Thai"), the profession from a work diary ("marked
thirty essays" -> "teacher"). Each inferable value has EVIDENCE_PHRASINGS phrasings (cities, behaviours,
dishes, diary entries), one drawn per user; none contains its value's word or a stem of it. The last
HELDOUT_PHRASINGS of each never reach training users: validation and test users get one of them for
half of their inferable traits, and those spans are marked "infer_heldout" (else "infer"), so
evaluations report inference from unseen evidence apart from recall of evidence seen in training.
Responses are natural text mixing generic words with these values; `persona_spans` marks every value
and `persona_span_kinds` says "copy", "infer" or "infer_heldout".

Splits hold disjoint users by construction (train: user ids 0 .. `users`-1; eval, the validation split:
the next `eval_users`; test: the next `eval_users`), so on eval a persona token can only come from
reading the profile. Why both kinds: with only copyable values a pretrained model copies them from the
first step and CE and PerCE both hit a ceiling (docs/method.md, "Persona data for pretrained models"). Pure
Python, seedable; no article ("a"/"an") ever precedes a value, so no unmarked token depends on the persona.
"""

from __future__ import annotations

from dataclasses import dataclass

from perce_ds.data.records import PersonaRecord
from perce_ds.data.synthetic_base import NAMES, PET_NAMES, SIGN_OFFS, balanced, derived_rng, request_records

TASK = "synthetic_persona_natural"
SPLITS = ("train", "eval", "test")
COPY, INFER, INFER_HELDOUT = "copy", "infer", "infer_heldout"

# Evidence of each inferable value: EVIDENCE_PHRASINGS per value, each user's profile states one of them. The
# last HELDOUT_PHRASINGS of each are held out: only validation/test users ever see them, and half of those
# users (per trait, balanced) get one, so "infer_heldout" tokens can only be predicted by inferring the value
# from evidence never seen in training, not by recalling a string that went with it there.
EVIDENCE_PHRASINGS, HELDOUT_PHRASINGS = 5, 2
# country -> its cities (the country is inferable from the user's city, which the profile states)
COUNTRY_CITIES = {
    "Portugal": ("Lisbon", "Porto", "Coimbra", "Braga", "Faro"),
    "Japan": ("Osaka", "Kyoto", "Sapporo", "Nagoya", "Fukuoka"),
    "Ireland": ("Dublin", "Cork", "Galway", "Limerick", "Kilkenny"),
    "Poland": ("Krakow", "Gdansk", "Wroclaw", "Poznan", "Lublin"),
    "Norway": ("Bergen", "Oslo", "Trondheim", "Stavanger", "Tromso"),
    "Australia": ("Adelaide", "Brisbane", "Melbourne", "Canberra", "Hobart"),
    "Canada": ("Halifax", "Toronto", "Montreal", "Vancouver", "Winnipeg"),
    "Spain": ("Seville", "Madrid", "Valencia", "Bilbao", "Granada"),
    "Germany": ("Munich", "Hamburg", "Cologne", "Leipzig", "Dresden"),
    "France": ("Lyon", "Marseille", "Bordeaux", "Toulouse", "Nantes"),
    "Italy": ("Florence", "Rome", "Milan", "Naples", "Bologna"),
    "Greece": ("Athens", "Thessaloniki", "Patras", "Heraklion", "Corfu"),
}
CITIES = {city: country for country, cities in COUNTRY_CITIES.items() for city in cities}  # city -> its country
# pet kind -> what such a pet does (the kind is inferable from the behaviour)
PET_SIGNS = {
    "dog": ("barked at the postman all morning", "fetched the same stick forty times in the park",
            "wagged his tail so hard that he knocked over a vase", "buried a bone under the roses and came back with a muddy nose",
            "howled along when the ambulance drove past"),
    "cat": ("purred on my lap all evening", "knocked a glass off the table and then washed her paws",
            "sharpened her claws on the new sofa", "left a dead mouse at the back door as a present",
            "hissed at the vacuum cleaner and hid under the bed"),
    "parrot": ("squawked along to the radio", "repeated the word hello until lunch",
               "whistled the doorbell tune until I opened the door for nobody", "flapped her bright green wings and said good morning to the kettle",
               "perched on my shoulder and mimicked the ringtone of my phone"),
    "rabbit": ("hopped around the garden nibbling carrots", "chewed through another cable with those long ears twitching",
               "thumped a back foot when the doorbell rang", "dug a burrow under the hedge and then binkied across the lawn",
               "munched a whole pile of hay and then flopped over in the hutch"),
    "horse": ("galloped across the paddock", "waited at the stable gate for an apple",
              "got new shoes from the farrier this morning", "neighed when I came down to the field with the saddle",
              "swished her tail at the flies while I brushed her mane"),
    "hamster": ("ran on the wheel all night", "stuffed both cheeks with sunflower seeds",
                "escaped from the cage and turned up in my slipper", "shredded a toilet roll tube to build a nest in the bedding",
                "rolled around the living room in a little plastic ball"),
}  # fmt: skip
# cuisine -> dishes of it (the cuisine is inferable from the dish); no dish shares its cuisine's word or stem
CUISINES = {
    "Thai": ("green curry with lemongrass and galangal", "tom yum soup, sour and fiery", "pad kra pao with holy basil",
             "massaman curry with peanuts and potatoes", "som tam pounded from green papaya in the mortar"),
    "Italian": ("risotto", "lasagne", "fresh tagliatelle with ragu", "osso buco with gremolata",
                "a margherita pizza with basil from the balcony"),
    "Mexican": ("tacos al pastor", "enchiladas verdes", "a big pot of pozole", "chiles rellenos stuffed with cheese",
                "mole poblano with chocolate and chillies"),
    "Japanese": ("sushi", "miso soup", "chicken katsu with tonkatsu sauce", "okonomiyaki on the griddle",
                 "a bowl of tonkotsu ramen with a soft egg"),
    "Indian": ("dal with plenty of cumin", "chicken tikka masala", "palak paneer and fresh naan",
               "a lamb biryani with saffron", "masala dosa with coconut chutney"),
    "Greek": ("moussaka", "souvlaki", "spanakopita with spinach and feta", "dolmades, vine leaves stuffed with rice",
              "pastitsio with a side of tzatziki"),
    "Korean": ("bibimbap", "kimchi stew", "bulgogi grilled at the table", "tteokbokki, the spicy rice cakes",
               "japchae glass noodles with sesame"),
    "French": ("coq au vin", "ratatouille", "beef bourguignon", "a quiche lorraine", "bouillabaisse with saffron and rouille"),
}  # fmt: skip
# profession -> what a working day looks like (the profession is inferable from the diary); no vowel starts
PROFESSIONS = {
    "teacher": ("Marked thirty essays tonight and planned tomorrow's lesson for my pupils.",
                "Parents' evening ran late; every parent wanted to talk about the spelling test.",
                "Spent the morning on fractions with year six and the afternoon on playground duty.",
                "Wrote report cards for the whole class until midnight.",
                "Took twenty-eight eleven-year-olds to the science museum without losing one."),
    "nurse": ("Another night shift on the ward, checking on patients and handing out medication.",
              "Changed dressings and took blood pressures all morning on the surgical ward.",
              "Twelve hours in the emergency department; my feet ache but every patient went home safe.",
              "Got the drip into the new patient in bed four on my first try.",
              "Handed the ward over to the day team at seven and finally went to sleep."),
    "chef": ("The dinner rush was wild: two hundred plates out of my kitchen before ten.",
             "Prepped forty kilos of onions before the lunch service started.",
             "A restaurant critic came in tonight and sent compliments to my kitchen.",
             "Burned my wrist on the grill during service, but the new menu was a hit.",
             "Wrote tomorrow's specials on the board and sharpened every knife on my station."),
    "programmer": ("Spent the whole day fixing a bug in the code before the software release.",
                   "My pull request finally passed review after three rounds of comments.",
                   "The servers crashed at midnight and I was up until four writing a patch.",
                   "Rewrote the login module in Python and all the tests went green.",
                   "Spent the evening hunting a memory leak with a debugger."),
    "farmer": ("Up at dawn to milk the cows and check on the wheat fields before the rain.",
               "Spent the day on the tractor bringing in the barley harvest.",
               "Two lambs were born in the barn last night; I hardly slept.",
               "Mended the fence of the sheep pasture and sold eggs at the market.",
               "Sprayed the potato crop and repaired the old combine harvester."),
    "pilot": ("Landed the plane in thick fog after a long flight, then slept at the crew hotel.",
              "Two return flights today from the cockpit, both with a full cabin.",
              "Spent the afternoon in the flight simulator practising engine failures.",
              "Crosswinds made the approach bumpy, but the passengers clapped when we touched down.",
              "Filed the flight plan, checked the weather and took off at six."),
    "lawyer": ("Spent the day in court defending my client, then read contracts until midnight.",
               "The judge finally ruled in our favour after a three-week trial.",
               "Drafted a settlement agreement and billed eleven hours today.",
               "Cross-examined a witness this morning; the jury looked convinced.",
               "Filed an appeal brief two minutes before the court deadline."),
    "dentist": ("Filled three cavities and cleaned a lot of teeth today; floss, people!",
                "Pulled a wisdom tooth this morning and fitted two crowns after lunch.",
                "Took X-rays of a nervous patient's molars and found no decay at all.",
                "Did a root canal before lunch and whitened a bride's smile after it.",
                "Reminded every patient today to brush twice a day and cut down on sugar."),
    "plumber": ("Fixed two leaking pipes and unblocked a drain for a customer this morning.",
                "Installed a new boiler and bled every radiator in the house.",
                "Crawled under a sink to replace a burst water pipe today.",
                "Fitted a shower and a new toilet in a bathroom on the high street.",
                "Spent the day on emergency call-outs for frozen pipes and flooded kitchens."),
    "librarian": ("Shelved returned books all morning and ran the reading hour for children.",
                  "Catalogued a box of donated first editions and chased three overdue loans.",
                  "Helped a student find old newspapers on microfilm and reshelved the poetry section.",
                  "Ran the book club tonight and issued forty new reader cards.",
                  "Asked a noisy group to whisper in the quiet study room, then sorted the returns trolley."),
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


# inferable trait -> value -> its evidence phrasings (the held-out ones last)
EVIDENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "country": COUNTRY_CITIES, "pet_kind": PET_SIGNS, "cuisine": CUISINES, "profession": PROFESSIONS,
}  # fmt: skip


def phrasings(trait: str, value: str, heldout: bool) -> tuple[str, ...]:
    """The evidence phrasings of an inferable value: the held-out ones (validation/test only) or the others."""
    every = EVIDENCE[trait][value]
    return every[-HELDOUT_PHRASINGS:] if heldout else every[:-HELDOUT_PHRASINGS]


@dataclass(frozen=True)
class NaturalPersona:
    """One user's fixed traits and the evidence phrasings their profile states."""

    user_id: str
    name: str
    city: str  # also the evidence of the country
    pet_name: str
    pet_kind: str
    cuisine: str
    profession: str
    hobby: str
    sign_off: str
    pet_sign: str  # evidence of pet_kind
    dish: str  # evidence of cuisine
    work_diary: str  # evidence of profession
    heldout: tuple[str, ...] = ()  # inferable traits whose evidence is a held-out phrasing

    def values(self) -> dict[str, str]:
        """Trait name -> the text inserted into a response (the country derived from the city)."""
        return {
            "name": self.name, "city": self.city, "country": CITIES[self.city], "pet_name": self.pet_name,
            "pet_kind": self.pet_kind, "cuisine": self.cuisine, "profession": self.profession,
            "hobby": self.hobby, "sign_off": self.sign_off,
        }  # fmt: skip

    def span_kinds(self) -> dict[str, str]:
        """Trait name -> the kind of its persona spans: KINDS, with "infer_heldout" for held-out evidence."""
        return {**KINDS, **dict.fromkeys(self.heldout, INFER_HELDOUT)}


def make_personas(n_users: int, seed: int, split: str = "train", first_id: int = 0) -> list[NaturalPersona]:
    """n_users personas ("n{first_id:03d}", ...) of `split`, identical for the same arguments; traits in balanced
    passes. Training users get the training phrasings only; validation/test users get, per inferable trait,
    a held-out phrasing for half of them (balanced) and a training phrasing for the rest."""
    if n_users < 0:
        raise ValueError(f"n_users must be >= 0, got {n_users}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = derived_rng("natural-personas", seed, split, first_id)
    cols = {
        "name": balanced(rng, NAMES, n_users),
        "country": balanced(rng, tuple(COUNTRY_CITIES), n_users),
        "pet_name": balanced(rng, PET_NAMES, n_users),
        "pet_kind": balanced(rng, tuple(PET_SIGNS), n_users),
        "cuisine": balanced(rng, tuple(CUISINES), n_users),
        "profession": balanced(rng, tuple(PROFESSIONS), n_users),
        "hobby": balanced(rng, HOBBIES, n_users),
        "sign_off": balanced(rng, SIGN_OFFS, n_users),
    }
    unseen = {t: balanced(rng, (True, False), n_users) if split != "train" else [False] * n_users for t in EVIDENCE}
    personas = []
    for i in range(n_users):
        row = {k: v[i] for k, v in cols.items()}
        pick = {t: rng.choice(phrasings(t, row[t], unseen[t][i])) for t in EVIDENCE}
        del row["country"]  # stated by the city picked from its cities
        personas.append(NaturalPersona(
            user_id=f"n{first_id + i:03d}", **row, city=pick["country"], pet_sign=pick["pet_kind"],
            dish=pick["cuisine"], work_diary=pick["profession"], heldout=tuple(t for t in EVIDENCE if unseen[t][i]),
        ))  # fmt: skip
    return personas


def profile_items(persona: NaturalPersona, seed: int) -> list[dict[str, str]]:
    """Five natural past posts: copyable values verbatim, inferable ones only through their evidence phrasing."""
    rng = derived_rng("natural-profile", seed, persona.user_id)
    p = persona
    items = [
        {"title": "Work diary", "text": p.work_diary},
        {"title": "My pet", "text": f"Yesterday {p.pet_name} {p.pet_sign}."},
        {"title": "Weekend", "text": f"I spent the whole weekend {p.hobby} and loved every minute. {p.sign_off}, {p.name}"},
        {"title": "Dinner", "text": f"Cooked {p.dish} tonight, and it was delicious. {p.sign_off}, {p.name}"},
        {"title": "Home", "text": f"The streets of {p.city} were busy today; I love living in {p.city}."},
    ]  # fmt: skip
    rng.shuffle(items)
    return items


def split_users(split: str, users: int, eval_users: int, seed: int) -> list[NaturalPersona]:
    """The users of a split, disjoint by construction: train the first `users` ids, eval (validation) the next
    `eval_users`, test the next `eval_users`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    start = {"train": 0, "eval": users, "test": users + eval_users}[split]
    return make_personas(users if split == "train" else eval_users, seed, split, first_id=start)


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
            user_id=persona.user_id, task=TASK, profile=profile, record_id_prefix=f"natural-{split}",
            span_kinds=persona.span_kinds(),
        )  # fmt: skip
    return records
