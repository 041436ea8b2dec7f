"""Our own word lists for the probing tasks.

Every list is written for this project.  Generators filter each list by the tokenizer in use (answers
must be single tokens, and nouns/names single tokens so clean and counterfactual prefixes align) and
split it into disjoint train and test vocabularies, so a probe is always tested on unseen words.
"""

from __future__ import annotations

# fmt: off
# ---- subject-verb agreement ------------------------------------------------------------------------
# (singular, plural) nouns: mostly animate, so "The N that the N2 admired" reads naturally.
NOUNS: tuple[tuple[str, str], ...] = (
    ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("pilot", "pilots"),
    ("lawyer", "lawyers"), ("singer", "singers"), ("dancer", "dancers"), ("writer", "writers"),
    ("student", "students"), ("officer", "officers"), ("nurse", "nurses"), ("driver", "drivers"),
    ("player", "players"), ("artist", "artists"), ("manager", "managers"), ("worker", "workers"),
    ("soldier", "soldiers"), ("author", "authors"), ("senator", "senators"), ("judge", "judges"),
    ("guard", "guards"), ("baker", "bakers"), ("actor", "actors"), ("coach", "coaches"),
    ("friend", "friends"), ("neighbor", "neighbors"), ("customer", "customers"), ("child", "children"),
    ("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"), ("king", "kings"),
    ("queen", "queens"), ("prince", "princes"), ("brother", "brothers"), ("sister", "sisters"),
    ("parent", "parents"), ("engineer", "engineers"), ("scientist", "scientists"),
    ("professor", "professors"), ("minister", "ministers"), ("surgeon", "surgeons"), ("chef", "chefs"),
    ("clerk", "clerks"), ("guest", "guests"), ("visitor", "visitors"), ("tourist", "tourists"),
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("wolf", "wolves"),
    ("bear", "bears"), ("lion", "lions"), ("rabbit", "rabbits"), ("mouse", "mice"), ("fox", "foxes"),
    ("monkey", "monkeys"), ("snake", "snakes"), ("editor", "editors"), ("banker", "bankers"),
    ("hunter", "hunters"), ("painter", "painters"), ("reporter", "reporters"), ("captain", "captains"),
    ("leader", "leaders"), ("member", "members"), ("patient", "patients"), ("client", "clients"),
    ("partner", "partners"), ("pupil", "pupils"),
)

# (singular, plural) present-tense forms of the main verb; the answer pair of an agreement item.
VERB_PAIRS: tuple[tuple[str, str], ...] = (
    ("is", "are"), ("was", "were"), ("has", "have"), ("does", "do"), ("goes", "go"), ("seems", "seem"),
    ("likes", "like"), ("knows", "know"), ("wants", "want"), ("makes", "make"), ("says", "say"),
    ("looks", "look"), ("needs", "need"), ("thinks", "think"), ("works", "work"),
)

# Verbs inside the relative clause "The N that the N2 V".  Past tense, so V carries no number.
RC_VERBS: tuple[str, ...] = (
    "liked", "saw", "met", "admired", "hated", "knew", "helped", "called", "trusted", "loved", "visited",
    "praised", "blamed", "feared", "followed", "watched", "thanked", "hired", "invited", "married",
    "missed", "found", "heard", "chose", "remembered", "avoided",
)

PREPOSITIONS: tuple[str, ...] = (
    "near", "behind", "beside", "with", "above", "below", "next to", "around",
)

# Determiners that do not mark number (so the subject noun alone carries it).
DETERMINERS: tuple[str, ...] = (
    "The", "My", "Your", "Our", "His", "Her", "Their",
)

# ---- coreference ----------------------------------------------------------------------------------
FEMALE_NAMES: tuple[str, ...] = (
    "Mary", "Anna", "Sarah", "Emma", "Lisa", "Laura", "Julia", "Kate", "Emily", "Alice", "Rachel",
    "Jessica", "Susan", "Linda", "Karen", "Helen", "Nancy", "Amy", "Lucy", "Jane", "Rose", "Maria",
    "Sophie", "Grace", "Claire", "Ruth", "Diana", "Elena", "Nina", "Olivia", "Hannah", "Chloe", "Jennifer",
    "Rebecca", "Victoria", "Betty", "Ellen", "Irene", "Judy", "Martha",
)
MALE_NAMES: tuple[str, ...] = (
    "John", "David", "Michael", "James", "Robert", "Peter", "Mark", "Paul", "Tom", "Daniel", "George",
    "Henry", "Jack", "Steven", "Richard", "Thomas", "Frank", "Kevin", "Brian", "Eric", "Adam", "Simon",
    "Chris", "Andrew", "Joseph", "Charles", "Edward", "Martin", "Victor", "Oliver", "Ryan", "Jason",
    "Matthew", "Patrick", "Scott", "Gary", "Ben", "Sam", "Tim", "Carl",
)

PLACES: tuple[str, ...] = (
    "market", "station", "library", "park", "office", "hospital", "museum", "airport", "hotel", "school",
    "beach", "restaurant", "church", "garden", "bakery", "theater", "stadium", "harbor", "cafe", "gym",
    "bank", "mall", "farm", "zoo",
)

# (past-tense verb, object): "Later, X bought the book because"
ACTIONS: tuple[tuple[str, str], ...] = (
    ("bought", "book"), ("found", "key"), ("painted", "picture"), ("sold", "car"), ("fixed", "bike"),
    ("ordered", "pizza"), ("cooked", "dinner"), ("wrote", "letter"), ("built", "table"), ("carried", "box"),
    ("opened", "door"), ("broke", "window"), ("made", "cake"), ("drew", "map"), ("washed", "shirt"),
    ("cleaned", "room"), ("signed", "contract"), ("baked", "bread"), ("planted", "tree"),
    ("sent", "message"), ("brought", "gift"), ("lost", "ticket"), ("stole", "wallet"), ("peeled", "apple"),
    ("read", "report"), ("won", "prize"),
)

# ---- disambiguation -------------------------------------------------------------------------------
# Each homonym has a "natural" sense (living thing, place in nature, body, person) and an "artifact"
# sense (made by people: tool, machine, institution, product).  The label is that contrast, consistent
# across homonyms, so a probe trained on some homonyms can be tested on disjoint ones.
# homonym -> {sense: (answer word after "...the H is a kind of", sense-fixing gerund contexts)}
HOMONYMS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "bank": {
        "natural": ("land", (
            "rowing slowly down the river",
            "watching ducks swim in the stream",
            "walking along the muddy shore of the creek",
        )),
        "artifact": ("business", (
            "depositing a paycheck",
            "asking about a loan for the house",
            "counting the cash from the shop",
        )),
    },
    "bass": {
        "natural": ("fish", (
            "casting a line into the lake",
            "sitting in a boat with a rod and bait",
            "reading a guide to freshwater angling",
        )),
        "artifact": ("instrument", (
            "practising with the band all night",
            "tuning the strings before the concert",
            "playing a low groove in the studio",
        )),
    },
    "crane": {
        "natural": ("bird", (
            "watching the wetlands at dawn",
            "counting feathers and nests by the marsh",
            "hiking through the swamp with binoculars",
        )),
        "artifact": ("machine", (
            "working on the construction site",
            "lifting steel beams for the new tower",
            "unloading containers at the dock",
        )),
    },
    "seal": {
        "natural": ("animal", (
            "walking on the icy beach",
            "watching the waves crash on the rocks",
            "visiting the arctic coast",
        )),
        "artifact": ("stamp", (
            "writing an official letter for the king",
            "melting red wax on the envelope",
            "preparing the royal documents",
        )),
    },
    "bat": {
        "natural": ("animal", (
            "exploring a dark cave at night",
            "hearing squeaks in the old barn",
            "watching insects fly around the lamp at dusk",
        )),
        "artifact": ("stick", (
            "practising baseball in the yard",
            "putting on a helmet for the game",
            "hitting balls at the batting cage",
        )),
    },
    "mouse": {
        "natural": ("animal", (
            "hearing scratching in the kitchen walls",
            "setting cheese in a trap",
            "watching the cat chase something in the barn",
        )),
        "artifact": ("device", (
            "clicking through files on the computer",
            "typing a long email on the laptop",
            "plugging a cable into the desktop",
        )),
    },
    "apple": {
        "natural": ("fruit", (
            "picking ripe produce in the orchard",
            "baking a pie for dessert",
            "climbing the tree in the garden",
        )),
        "artifact": ("company", (
            "reading the news about smartphone sales",
            "checking the tech stock prices",
            "watching a keynote about new laptops",
        )),
    },
    "jaguar": {
        "natural": ("cat", (
            "trekking deep into the rainforest",
            "following tracks through the jungle",
            "watching a documentary about wild predators",
        )),
        "artifact": ("car", (
            "visiting a luxury dealership",
            "test driving sports models on the highway",
            "reading a review of fast sedans",
        )),
    },
    "python": {
        "natural": ("snake", (
            "walking through the reptile house at the zoo",
            "watching lizards in the terrarium",
            "reading about constrictors in the jungle",
        )),
        "artifact": ("language", (
            "debugging code all afternoon",
            "writing a script for the data analysis",
            "installing packages on the server",
        )),
    },
    "bug": {
        "natural": ("insect", (
            "turning over rocks in the garden",
            "watching ants march across the leaves",
            "collecting beetles in a jar",
        )),
        "artifact": ("error", (
            "testing the new software release",
            "reading the crash logs of the app",
            "reviewing the code before the launch",
        )),
    },
    "virus": {
        "natural": ("germ", (
            "coughing and sneezing all week",
            "visiting the doctor with a high fever",
            "reading about the flu season",
        )),
        "artifact": ("program", (
            "scanning the hard drive for malware",
            "updating the antivirus software",
            "noticing strange pop-ups on the computer",
        )),
    },
    "spring": {
        "natural": ("season", (
            "watching the snow melt and flowers bloom",
            "hearing birds return after winter",
            "planting tulips as the days grew warmer",
        )),
        "artifact": ("coil", (
            "taking apart the old mattress",
            "repairing the broken clock mechanism",
            "fixing the suspension of the bicycle",
        )),
    },
    "plant": {
        "natural": ("flower", (
            "watering the garden in the morning",
            "repotting herbs on the windowsill",
            "visiting the greenhouse with an aunt",
        )),
        "artifact": ("factory", (
            "touring the industrial zone",
            "starting a shift on the assembly line",
            "inspecting the chemical production line",
        )),
    },
    "organ": {
        "natural": ("body", (
            "studying anatomy for the medical exam",
            "watching a surgeon operate",
            "reading about the human liver and kidneys",
        )),
        "artifact": ("instrument", (
            "rehearsing hymns in the cathedral",
            "pressing the pedals and keys",
            "listening to Bach in the church",
        )),
    },
    "star": {
        "natural": ("sun", (
            "looking through a telescope at night",
            "studying astronomy and galaxies",
            "lying in the field watching the night sky",
        )),
        "artifact": ("celebrity", (
            "watching the film premiere on the red carpet",
            "reading gossip magazines about Hollywood",
            "waiting for autographs outside the theater",
        )),
    },
    "date": {
        "natural": ("fruit", (
            "walking through the palm grove in the desert",
            "shopping for dried figs and nuts",
            "making a sweet snack from the oasis harvest",
        )),
        "artifact": ("meeting", (
            "getting ready for a romantic dinner",
            "choosing a nice outfit for the evening",
            "booking a table for two",
        )),
    },
    "chest": {
        "natural": ("body", (
            "lifting weights at the gym",
            "feeling a sharp pain while breathing",
            "stretching the muscles after the run",
        )),
        "artifact": ("box", (
            "searching the attic for old treasure",
            "packing blankets for the move",
            "opening the pirate's wooden lid",
        )),
    },
    "fan": {
        "natural": ("person", (
            "cheering at the stadium",
            "waiting in line to meet the band",
            "wearing the team jersey to the match",
        )),
        "artifact": ("device", (
            "sweating in the hot summer room",
            "turning on the cooling switch",
            "feeling the air blow across the desk",
        )),
    },
    "speaker": {
        "natural": ("person", (
            "listening to the lecture in the hall",
            "attending the conference keynote",
            "applauding the guest at the ceremony",
        )),
        "artifact": ("device", (
            "connecting the stereo to the television",
            "turning up the volume of the music",
            "unboxing new audio equipment",
        )),
    },
    "cookie": {
        "natural": ("food", (
            "baking treats with a grandmother",
            "mixing flour, sugar and chocolate chips",
            "setting out milk for dessert",
        )),
        "artifact": ("file", (
            "clearing the browser history",
            "reading the website privacy policy",
            "tracking visitors on the web page",
        )),
    },
    "bill": {
        "natural": ("beak", (
            "watching a duck feed in the pond",
            "photographing a pelican at the shore",
            "observing birds at the feeder",
        )),
        "artifact": ("payment", (
            "eating an expensive meal at the restaurant",
            "sorting the mail on the kitchen table",
            "checking the electricity costs",
        )),
    },
    "amazon": {
        "natural": ("river", (
            "paddling a canoe through the rainforest",
            "studying the geography of Brazil",
            "reading about the jungle in South America",
        )),
        "artifact": ("company", (
            "shopping online for a birthday gift",
            "tracking the delivery of a package",
            "reading about online retail giants",
        )),
    },
}

# Sense-neutral clauses: "<Intro> <context>, <pron> <verb> the <homonym>."
CONTEXT_INTROS: tuple[str, ...] = (
    "After", "While", "Having spent the day", "Tired from",
)
HOMONYM_VERBS: tuple[str, ...] = (
    "noticed", "looked at", "talked about", "thought about",
)
DISAMBIGUATION_FRAMES: dict[str, str] = {  # template name -> frame
    "kind_of": "The {h} is a kind of", "story": "In this story, the {h} is a kind of",
    "word_means": "Here the word {h} means a kind of",
}
# fmt: on
