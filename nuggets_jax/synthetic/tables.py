"""The word and fact tables the synthetic data is generated from (`families.py`).

Tuples, never sets, so every table has one order on every run and machine: the families
enumerate their questions in table order, and the held-out split depends on that order.
"""

# Unit conversion: (from unit, to unit, factor, smallest and largest amount)
CONVERSIONS = (
    ("kilometers", "meters", 1000, 2, 40),
    ("meters", "centimeters", 100, 2, 40),
    ("kilograms", "grams", 1000, 2, 40),
    ("liters", "milliliters", 1000, 2, 40),
    ("hours", "minutes", 60, 2, 24),
    ("minutes", "seconds", 60, 2, 60),
    ("days", "hours", 24, 2, 30),
    ("weeks", "days", 7, 2, 52),
)

# String edits.
WORDS = (
    "apple", "river", "garden", "window", "pencil", "rocket", "silver", "forest", "button",
    "candle", "dragon", "island", "jacket", "kitten", "lemon", "marble", "needle", "orange",
    "planet", "rabbit", "saddle", "tunnel", "violin", "wallet", "yellow", "zipper", "basket",
    "castle", "desert", "engine", "falcon", "guitar", "hammer", "insect", "jungle", "ladder",
    "mirror", "napkin", "oyster", "parrot", "ribbon", "spider", "tomato", "velvet", "walnut",
    "bridge", "cloud", "stone", "music",
)  # fmt: skip

# Facts.
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Argentina", "Buenos Aires"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("the Philippines", "Manila"), ("Cuba", "Havana"), ("New Zealand", "Wellington"),
    ("the United Kingdom", "London"), ("Mexico", "Mexico City"), ("Iceland", "Reykjavik"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
)  # fmt: skip
SYMBOLS = (
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"),
    ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"),
    ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("argon", "Ar"),
    ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"),
    ("silver", "Ag"), ("gold", "Au"), ("tin", "Sn"), ("lead", "Pb"), ("mercury", "Hg"),
    ("nickel", "Ni"), ("iodine", "I"), ("uranium", "U"), ("platinum", "Pt"), ("tungsten", "W"),
)  # fmt: skip
PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
# One direction only where the reverse has several answers (short -> long or tall, light -> dark or heavy).
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("clean", "dirty"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("wide", "narrow"),
    ("high", "low"), ("wet", "dry"), ("strong", "weak"), ("rich", "poor"), ("thick", "thin"),
    ("loud", "quiet"), ("push", "pull"), ("win", "lose"), ("buy", "sell"), ("inside", "outside"),
    ("above", "below"), ("before", "after"), ("true", "false"), ("left", "right"), ("north", "south"),
    ("east", "west"), ("day", "night"), ("long", "short"), ("heavy", "light"), ("first", "last"),
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip

# Formatting: comma lists and sorting (triples of nouns), JSON people, title-case phrases.
NOUNS = (
    "apple", "bread", "chair", "daisy", "eagle", "flute", "grape", "house", "igloo", "juice",
    "kite", "lamp", "mango", "nest", "olive", "piano",
)  # fmt: skip
NAMES = (
    "Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kim", "Leo",
    "Mia", "Noah", "Omar", "Pia", "Ravi", "Sara", "Tom", "Zoe",
)  # fmt: skip
ADJECTIVES = ("quiet", "happy", "green", "little", "bright", "old")
PLACES_NOUNS = ("garden", "river", "house", "morning", "road")
PLACES = ("street", "park", "lane")
