"""A deterministic stand-in for the real marketplace export.

The demo, the DVC pipeline and the fast tests need data that looks like a real
Gumtree export (same files, same columns, same quirks) without shipping real
listings. Everything here derives from `sample.seed`, so the same params give
byte-identical files and DVC never sees a spurious change.

Both modalities carry signal that is learnable but imperfect: each root category
has its own words and its own look (shape, palette, texture), but words are
shared across related categories, photos carry clutter and jitter, and a
`label_noise` share of listings show content from another category. Every
real-export quirk is injected on an exact, counted set of rows and listed in
`sample_manifest.json`, so validation and cleaning tests can assert on them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline_steps.errors import ConfigError
from pipeline_steps.io_utils import atomic_dir, file_sha256, write_json

MANIFEST_NAME = "sample_manifest.json"
FORMAT_VERSION = 1
PRODUCT_COLUMNS = ("", "id", "product_name", "category", "product_description", "price", "location", "create_time")
IMAGE_COLUMNS = ("", "id", "product_id", "bucket_link", "image_ref", "create_time")
# The real export ends Products.csv lines with \n but Images.csv lines with \r\n.
PRODUCTS_LINE_END, IMAGES_LINE_END = "\n", "\r\n"
BUCKET_URL = "https://marketplace-sample.s3.eu-west-1.amazonaws.com/images/"
JPEG_QUALITY = 85
BAD_PRICES = ("Free", "", "£1,234,567.00")
# JPEG cannot hold alpha or a palette, so those modes travel in the formats a phone or a
# website would really have produced them in; the file name still says .jpg.
ODD_MODE_FORMATS = {"L": "JPEG", "RGBA": "WEBP", "P": "GIF", "CMYK": "JPEG"}
PRODUCT_QUIRKS = (
    "empty_description",
    "bad_price",
    "carriage_return",
    "category_without_separator",
    "no_image",
    "label_noise",
)
QUIRK_KEYS = (
    "duplicate_listing",
    "empty_description",
    "bad_price",
    "carriage_return",
    "category_without_separator",
    "no_image",
    "odd_image_mode",
)
SINGLE_FILE_QUIRKS = ("zero_byte_image", "truncated_image", "png_as_jpg", "missing_image_file")
_BASE_DATE = dt.date(2022, 2, 26)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class CategorySpec:
    """What makes one root recognisable: its words, its price level and its look."""

    root: str
    weight: int  # listings per root in the real export, so the class balance looks real
    paths: tuple[str, ...]
    family: str
    nouns: tuple[str, ...]
    brands: tuple[str, ...]
    median_price: float
    shape: str
    palette: tuple[RGB, ...]
    texture: str


FAMILY_WORDS: dict[str, tuple[str, ...]] = {
    "tech": ("charger", "cable", "screen", "battery", "wireless", "bluetooth", "usb", "case", "hdmi",
             "storage", "memory", "remote", "controller", "digital"),
    "home": ("wood", "oak", "white", "metal", "drawers", "glass", "assembled", "solid", "cabinet",
             "shelf", "frame", "handle", "grey", "unit"),
    "personal": ("size", "pink", "soft", "gift", "small", "cotton", "bundle", "age", "cute", "fabric",
                 "colour", "matching", "worn", "boxed"),
    "leisure": ("collection", "vintage", "set", "edition", "rare", "box", "hobby", "complete", "classic",
                "kit", "pieces", "bag", "retro", "signed"),
}
FILLER_WORDS = ("item", "items", "bits", "stuff", "job lot", "things", "spares", "bundle", "lot")
ADJECTIVES = ("Good", "Used", "New", "Brand new", "Excellent", "Lovely", "Large", "Small", "Quality",
              "Vintage", "Modern", "Boxed", "Immaculate", "Working", "Cheap", "Nice", "Great")
CONDITIONS = ("good", "excellent", "fair", "great", "working", "mint", "used")
PEOPLE = ("Nisha", "sue", "Dave", "Karen", "Tom", "Aisha", "Mark", "Jo", "Priya", "Gary", "Emma", "Liam")
GENERIC_SENTENCES = (
    "Collection only.", "Cash on collection.", "Smoke and pet free home.", "Open to sensible offers.",
    "No time wasters please.", "Can deliver locally for a small fee.", "Any questions please ask.",
    "Don’t miss out!", "👉 Delivery available", "Used but in good working order.",
    "Never used, still in original packaging.", "Selling as no longer needed.", "First to see will buy.",
    "Price is firm.", "Grab a bargain.", "Clearing out the loft.", "Message me for more photos.",
)
NOUN_TEMPLATES = (
    "{Adj} {noun} for sale.", "Comes with {noun} and {noun2}.", "Selling my {noun} as moving house.",
    "Perfect {noun}, hardly used.", "Includes original {noun}.", "Great for anyone looking for a {noun}.",
    "{Noun} in {cond} condition.", "Also have a {noun} available, message me.", "{Brand} {noun}, {cond} condition.",
    "Bought this {noun} last year.", "Ideal {noun} for a first home.",
)
LOCATIONS = (
    "Southampton, Hampshire", "Downend, Bristol", "Leicester, Leicestershire", "Norwich, Norfolk",
    "Wolverhampton, West Midlands", "Newcastle, Tyne and Wear", "Brighton, East Sussex", "Bournemouth, Dorset",
    "Croydon, London", "Bradford, West Yorkshire", "Sheffield, South Yorkshire", "Southside, Glasgow",
    "East London, London", "Coventry, West Midlands", "Paisley, Renfrewshire", "Bootle, Merseyside",
    "Stoke-on-Trent, Staffordshire", "Plymouth, Devon", "Hull, East Yorkshire", "Preston, Lancashire",
    "Strabane, County Tyrone", "Bolton, Manchester", "Caldicot, Monmouthshire", "Verwood, Dorset",
    "New Town, Edinburgh", "Portlethen, Aberdeen", "Llantwit Major, Vale of Glamorgan", "Dunfermline, Fife",
    "Tottenham, London", "Tredegar, Blaenau Gwent", "Yeovil, Somerset", "Grangemouth, Falkirk",
    "Reigate, Surrey", "West Bromwich, West Midlands", "Armagh, County Armagh", "Ely, Cambridgeshire",
    "Blyth, Northumberland", "Oxford, Oxfordshire", "Earls Colne, Essex", "Broxburn, West Lothian",
    "Wokingham, Berkshire", "Inverness, Highland", "Skegness, Lincolnshire", "Radstock, Somerset",
    "Delph, Manchester", "Newent, Gloucestershire", "Lytham St Annes, Lancashire", "Cardiff, Cardiff",
    # The real export has a few bare towns, so "Town, County" parsing must cope without a county.
    "London", "Aberdeen",
)

CATEGORIES: tuple[CategorySpec, ...] = (
    CategorySpec(
        "Appliances", 331,
        ("Fridge Freezers", "Washing Machines", "Home Appliances / Vacuum Cleaners",
         "Ovens, Hobs & Cookers / Cookers / Freestanding", "Home Appliances / Heating, Fires & Surrounds"),
        "home",
        ("fridge", "freezer", "washing machine", "dishwasher", "microwave", "oven", "kettle", "toaster",
         "hoover", "tumble dryer", "cooker", "hob", "heater", "extractor", "air fryer", "blender"),
        ("Bosch", "Beko", "Hotpoint", "Dyson", "Zanussi", "Indesit", "Samsung"),
        120.0, "square", ((225, 225, 225), (150, 150, 160), (60, 60, 70)), "solid",
    ),
    CategorySpec(
        "Baby & Kids Stuff", 249,
        ("Toys", "Baby Clothes", "Prams & Strollers", "Kids Clothes, Shoes & Accessories / Shoes & Boots",
         "Nursery & Children's Furniture / Cots & Beds"),
        "personal",
        ("pram", "pushchair", "cot", "high chair", "toy", "teddy", "car seat", "baby monitor", "stroller",
         "bouncer", "playpen", "baby grow", "changing mat", "lego", "dolls house", "rocking horse"),
        ("Mamas & Papas", "Silver Cross", "Chicco", "Graco", "Fisher-Price", "iCandy"),
        25.0, "star", ((255, 182, 193), (255, 240, 150), (170, 220, 255)), "dots",
    ),
    CategorySpec(
        "Clothes, Footwear & Accessories", 241,
        ("Jewellery", "Women's Clothing / Dresses", "Women's Accessories / Women's Bags & Handbags",
         "Men's Clothing / Coats & Jackets", "Women's Shoes / Boots", "Watches"),
        "personal",
        ("dress", "jacket", "coat", "boots", "trainers", "handbag", "necklace", "ring", "jeans", "shirt",
         "heels", "scarf", "earrings", "bracelet", "jumper", "blazer"),
        ("Zara", "Nike", "Adidas", "Next", "Ted Baker", "Michael Kors", "Barbour"),
        20.0, "diamond", ((128, 40, 160), (200, 120, 220), (90, 20, 90)), "stripes",
    ),
    CategorySpec(
        "Computers & Software", 373,
        ("Computers, Laptops & Netbooks / PC Laptops & Netbooks",
         "Computers, Laptops & Netbooks / Desktop & Workstation PCs",
         "Computers, Laptops & Netbooks / Tablets, eBooks & eReaders",
         "Computers, Laptops & Netbooks / Printers & Scanners", "Computers, Laptops & Netbooks / Apple Laptops"),
        "tech",
        ("laptop", "desktop", "monitor", "keyboard", "mouse", "printer", "graphics card", "tablet", "ssd",
         "motherboard", "processor", "ram", "router", "webcam", "macbook", "scanner"),
        ("Dell", "HP", "Lenovo", "Acer", "Asus", "Apple", "Nvidia"),
        150.0, "square", ((30, 80, 200), (100, 170, 240), (20, 30, 90)), "checker",
    ),
    CategorySpec(
        "DIY Tools & Materials", 319,
        ("Doors & Windows", "Wood & Timber", "Building Materials / Other Building Materials",
         "Hand Tools / Other Hand Tools", "Tool Storage & Workbenches", "Plumbing & Central Heating"),
        "home",
        ("drill", "saw", "hammer", "ladder", "timber", "door", "window", "spanner", "toolbox", "workbench",
         "paving slabs", "radiator", "screws", "sander", "plasterboard", "tiles"),
        ("Makita", "DeWalt", "Bosch", "Stanley", "Ryobi", "Black & Decker"),
        40.0, "triangle", ((230, 120, 30), (140, 80, 40), (250, 190, 90)), "stripes",
    ),
    CategorySpec(
        "Health & Beauty", 365,
        ("Mobility, Disability & Medical", "Hair Care & Styling", "Make Up & Cosmetics", "Fragrances",
         "Health Care", "Bath & Body"),
        "personal",
        ("perfume", "wheelchair", "mobility scooter", "hair dryer", "straighteners", "makeup", "lipstick",
         "moisturiser", "walking frame", "shaver", "nail polish", "aftershave", "foundation", "commode"),
        ("Chanel", "Dior", "GHD", "Remington", "Boots", "Clinique"),
        30.0, "circle", ((255, 182, 193), (240, 200, 230), (190, 100, 140)), "solid",
    ),
    CategorySpec(
        "Home & Garden", 488,
        ("Other Household Goods", "Dining, Living Room Furniture / Sofas, Armchairs & Suites / Private",
         "Dining, Living Room Furniture / Dining Tables & Chairs", "Garden & Patio / Outdoor Settings & Furniture",
         "Dining, Living Room Furniture / Mirrors, Clocks & Ornaments", "Beds & Bedroom Furniture / Double Beds"),
        "home",
        ("sofa", "armchair", "mirror", "dining table", "bed frame", "wardrobe", "lamp", "rug", "curtains",
         "sun loungers", "garden bench", "plant pot", "coffee table", "mattress", "bookcase", "clock"),
        ("Ikea", "Dunelm", "John Lewis", "DFS", "Habitat", "Next Home"),
        60.0, "hexagon", ((60, 150, 70), (150, 200, 110), (30, 90, 40)), "solid",
    ),
    CategorySpec(
        "Music, Films, Books & Games", 373,
        ("Books, Comics & Magazines / Books", "Music / Vinyl", "Music / CDs", "Films & TV / DVDs",
         "Games & Board Games", "Books, Comics & Magazines / Comics"),
        "leisure",
        ("book", "novel", "vinyl", "record", "cd", "dvd", "blu-ray", "board game", "comic", "album",
         "box set", "paperback", "jigsaw", "hardback", "lp", "annual"),
        ("Penguin", "Marvel", "Beatles", "Disney", "Hasbro", "BBC"),
        10.0, "circle", ((128, 40, 160), (90, 20, 90), (220, 60, 60)), "dots",
    ),
    CategorySpec(
        "Office Furniture & Equipment", 392,
        ("Restaurant & Catering Equipment", "Office Furniture / Desks & Tables", "Office Furniture / Chairs",
         "Office Furniture / Storage & Filing Cabinets", "Retail & Shop Fittings / Cash Registers & Supplies"),
        "home",
        ("office chair", "desk", "filing cabinet", "catering fridge", "till", "shelving", "meeting table",
         "pedestal", "counter", "display unit", "whiteboard", "shredder", "bain marie", "swivel chair"),
        ("Herman Miller", "Steelcase", "Buffalo", "Lincat", "Casio", "Bisley"),
        80.0, "hexagon", ((225, 225, 225), (150, 150, 160), (60, 60, 70)), "stripes",
    ),
    CategorySpec(
        "Other Goods", 313,
        ("Hobbies, Interests & Collectibles", "Other", "Scrapbooking, Sewing, Art, Craft", "Antiques",
         "Aquariums"),
        "leisure",
        ("aquarium", "fish tank", "sewing machine", "coins", "stamps", "antique", "painting", "model train",
         "figurine", "craft supplies", "pottery", "medals", "easel", "canvas"),
        ("Hornby", "Singer", "Royal Doulton", "Wedgwood", "Fluval", "Brother"),
        30.0, "cross", ((60, 150, 70), (150, 200, 110), (140, 80, 40)), "noise",
    ),
    CategorySpec(
        "Phones, Mobile Phones & Telecoms", 274,
        ("Mobile Phones / Apple iPhone", "Mobile Phones / Samsung", "Smart Watch", "Mobile Phones / Other",
         "Mobile Phone Accessories / Cases & Covers"),
        "tech",
        ("iphone", "phone", "smartphone", "smart watch", "galaxy", "sim", "earbuds", "headset", "phone case",
         "airpods", "handset", "unlocked", "pixel", "screen protector"),
        ("Apple", "Samsung", "Google", "Huawei", "Motorola", "Nokia"),
        120.0, "diamond", ((30, 80, 200), (100, 170, 240), (20, 30, 90)), "solid",
    ),
    CategorySpec(
        "Sports, Leisure & Travel", 290,
        ("Bicycles", "Fitness & Gym Equipment / Other Fitness & Gym Equipment", "Bicycle Accessories",
         "Golf Equipment / Clubs", "Ball & Racquet Sport Equipment / Cricket"),
        "leisure",
        ("bike", "bicycle", "mountain bike", "dumbbells", "treadmill", "golf clubs", "tennis racket",
         "cricket bat", "helmet", "weights", "exercise bike", "tent", "wetsuit", "football"),
        ("Carrera", "Trek", "Boardman", "Callaway", "Slazenger", "Decathlon"),
        80.0, "triangle", ((60, 150, 70), (150, 200, 110), (250, 190, 90)), "dots",
    ),
    CategorySpec(
        "Video Games & Consoles", 292,
        ("Games", "Consoles / Xbox One", "Consoles / PS4 (Sony Playstation 4)", "Consoles / Other Consoles",
         "Video Game Accessories / Other Video Game Accessories", "Consoles / PS5 (Sony PlayStation 5)"),
        "tech",
        ("ps4", "ps5", "xbox", "nintendo switch", "console", "gamepad", "fifa", "joystick", "game",
         "playstation", "wii", "gaming headset", "controller", "call of duty"),
        ("Sony", "Microsoft", "Nintendo", "Sega", "Turtle Beach", "Razer"),
        90.0, "star", ((220, 40, 40), (250, 120, 100), (120, 20, 20)), "checker",
    ),
)
SHAPES = ("square", "star", "diamond", "triangle", "circle", "hexagon", "cross")
TEXTURES = ("solid", "stripes", "dots", "checker", "noise")

# How strongly each modality points at the listed root; tuned so a simple model lands
# well above chance (1/13) and well below perfect (see tests/test_sample_data.py).
TEXT_SLOT_WEIGHTS = {"own": 0.58, "brand": 0.08, "family": 0.2, "other": 0.05, "filler": 0.09}
WEAK_TEXT_RATE = 0.07
GENERIC_SENTENCE_RATE = 0.25
SHAPE_KEEP, PALETTE_KEEP, TEXTURE_KEEP = 0.85, 0.85, 0.85


@dataclass(frozen=True)
class SampleParams:
    """The validated `sample:` section, so the generator never reads a half-checked dict."""

    seed: int
    n_products: int
    max_images_per_product: int
    image_size_min: int
    image_size_max: int
    quirks: dict[str, float]
    label_noise: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "n_products": self.n_products,
            "max_images_per_product": self.max_images_per_product,
            "image_size_min": self.image_size_min,
            "image_size_max": self.image_size_max,
            "quirks": dict(self.quirks),
            "label_noise": self.label_noise,
        }


@dataclass
class Product:
    """One Products.csv row plus what it really shows, which may differ from its label."""

    index: int  # position among the unique listings (seeds its photos)
    product_id: str
    root: str
    content_root: str
    category: str
    name: str
    description: str
    price: str
    location: str
    create_time: str
    n_images: int
    duplicate_of: str | None = None
    image_ids: list[str] = field(default_factory=list)


@dataclass
class ImageJob:
    """One file to write (or deliberately not write) under images/."""

    image_id: str
    product_id: str | None
    content_root: str
    seed_key: tuple[int, ...]
    create_time: str
    kind: str = "normal"  # normal | odd_mode | zero_byte | truncated | png | missing | orphan | copy
    mode: str = "RGB"
    size: tuple[int, int] | None = None
    copy_of: str | None = None
    in_csv: bool = True


# ---------------------------------------------------------------- public API


def generate_sample(out_dir: Path, sample_params: Mapping[str, Any]) -> dict[str, Any]:
    """Write a raw export to `out_dir` (replaced as a whole) and return its manifest.

    The folder is built in a temporary sibling and swapped in at the end, so a crash
    leaves either the previous sample or none, never a half-written one.
    """
    params = parse_params(sample_params)
    rng = np.random.default_rng([params.seed, 0])
    products = _plan_products(params, rng)
    quirks = _assign_product_quirks(products, params, rng)
    ordered = _insert_duplicates(products, quirks, params, rng)
    jobs = _plan_images(ordered, params, rng)
    quirks.update(_assign_image_quirks(ordered, jobs, quirks, params, rng))
    with atomic_dir(out_dir) as tmp:
        _write_images(tmp / "images", jobs, params)
        _write_products_csv(tmp / "Products.csv", ordered, rng)
        _write_images_csv(tmp / "Images.csv", jobs, rng)
        manifest = _build_manifest(tmp, params, ordered, jobs, quirks)
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def parse_params(sample_params: Mapping[str, Any]) -> SampleParams:
    """Fail early, naming the params.yaml key, instead of deep inside the drawing code."""
    required = ("seed", "n_products", "max_images_per_product", "image_size_min", "image_size_max", "quirks", "label_noise")
    for key in required:
        if key not in sample_params:
            raise ConfigError(f"params.yaml has no key 'sample.{key}'")
    raw_quirks = sample_params["quirks"] or {}
    unknown = sorted(set(raw_quirks) - set(QUIRK_KEYS))
    if unknown:
        raise ConfigError(f"unknown keys under 'sample.quirks': {unknown}; accepted: {list(QUIRK_KEYS)}")
    missing = [key for key in QUIRK_KEYS if key not in raw_quirks]
    if missing:
        raise ConfigError(f"params.yaml has no key 'sample.quirks.{missing[0]}' (0 turns a quirk off)")
    quirks = {key: _fraction(raw_quirks[key], f"sample.quirks.{key}") for key in QUIRK_KEYS}
    params = SampleParams(
        seed=_integer(sample_params["seed"], "sample.seed", minimum=0),
        n_products=_integer(sample_params["n_products"], "sample.n_products", minimum=1),
        max_images_per_product=_integer(sample_params["max_images_per_product"],
                                         "sample.max_images_per_product", minimum=1),
        image_size_min=_integer(sample_params["image_size_min"], "sample.image_size_min", minimum=32),
        image_size_max=_integer(sample_params["image_size_max"], "sample.image_size_max", minimum=33),
        quirks=quirks,
        label_noise=_fraction(sample_params["label_noise"], "sample.label_noise"),
    )
    if params.image_size_min >= params.image_size_max:
        raise ConfigError("'sample.image_size_min' must be below 'sample.image_size_max' (photos are never square)")
    needed = _products_needed(params)
    if params.n_products < needed:
        raise ConfigError(f"'sample.n_products' is {params.n_products}; these quirk fractions need at least {needed}")
    return params


def quirk_count(fraction: float, n_products: int) -> int:
    """Every enabled quirk appears at least once, so tiny test samples still exercise it."""
    if fraction <= 0:
        return 0
    return max(1, math.floor(fraction * n_products + 0.5))


def class_names() -> list[str]:
    """The 13 roots, sorted like labels.json, for callers that need them without generating."""
    return sorted(spec.root for spec in CATEGORIES)


# ---------------------------------------------------------------- params helpers


def _integer(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"params.yaml key '{key}' is {value!r}; expected an integer >= {minimum}")
    return int(value)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"params.yaml key '{key}' is {value!r}; expected a fraction in [0, 1)")
    return float(value)


def _product_quirk_counts(params: SampleParams) -> dict[str, int]:
    counts = {name: quirk_count(params.quirks.get(name, 0.0), params.n_products)
              for name in PRODUCT_QUIRKS if name != "label_noise"}
    if counts["carriage_return"] == 1:
        counts["carriage_return"] = 2  # one \r inside quotes and one outside, as in the real file
    counts["label_noise"] = quirk_count(params.label_noise, params.n_products)
    return counts


def _products_needed(params: SampleParams) -> int:
    """Quirks go on disjoint listings so each one's count stays exact."""
    per_product = sum(_product_quirk_counts(params).values())
    duplicates = quirk_count(params.quirks["duplicate_listing"], params.n_products)
    image_quirks = quirk_count(params.quirks["odd_image_mode"], params.n_products) + len(SINGLE_FILE_QUIRKS)
    return per_product + 2 * duplicates + image_quirks + 1


# ---------------------------------------------------------------- products


def _plan_products(params: SampleParams, rng: np.random.Generator) -> list[Product]:
    n_unique = params.n_products - quirk_count(params.quirks["duplicate_listing"], params.n_products)
    roots = _allocate_roots(n_unique, rng)
    return [_make_product(i, root, root, params, rng) for i, root in enumerate(roots)]


def _allocate_roots(n: int, rng: np.random.Generator) -> list[str]:
    """Real class balance, but every root gets a few rows so small samples keep all 13 classes."""
    minimum = min(5, n // len(CATEGORIES))
    rest = n - minimum * len(CATEGORIES)
    weights = np.array([spec.weight for spec in CATEGORIES], dtype=float)
    quotas = rest * weights / weights.sum()
    counts = np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[: rest - counts.sum()]] += 1
    roots = [spec.root for spec, count in zip(CATEGORIES, counts + minimum) for _ in range(count)]
    return [roots[i] for i in rng.permutation(len(roots))]


def _make_product(index: int, root: str, content_root: str, params: SampleParams,
                  rng: np.random.Generator) -> Product:
    spec, content = _spec(root), _spec(content_root)
    path = spec.paths[int(rng.integers(len(spec.paths)))]
    location = LOCATIONS[int(rng.integers(len(LOCATIONS)))]
    title, description = _listing_text(rng, content, f"{root} / {path}", location)
    n_images = int(rng.integers(1, params.max_images_per_product + 1))
    return Product(
        index=index,
        product_id=_uuid(rng),
        root=root,
        content_root=content_root,
        category=f"{root} / {path}",
        name=f"{title} | in {location} | Gumtree",
        description=description,
        price=format_price(_draw_price(rng, content)),
        location=location,
        create_time=(_BASE_DATE + dt.timedelta(days=int(rng.integers(0, 3)))).isoformat(),
        n_images=n_images,
    )


def _spec(root: str) -> CategorySpec:
    return next(spec for spec in CATEGORIES if spec.root == root)


def _uuid(rng: np.random.Generator) -> str:
    """uuid4-shaped ids that come from the seed, not from the OS, so reruns match."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _draw_price(rng: np.random.Generator, spec: CategorySpec) -> float:
    """Log-normal around the root's typical price, rounded the way sellers round."""
    value = spec.median_price * math.exp(0.85 * rng.standard_normal())
    if value >= 50 and rng.random() < 0.6:
        return float(max(5, 5 * round(value / 5)))
    if rng.random() < 0.1:
        return round(max(0.5, value), 2)
    return float(max(1, round(value)))


def format_price(value: float) -> str:
    """The export's price text, e.g. 1234 -> "£1,234.00"; tests parse it back."""
    return f"£{value:,.2f}"


# ---------------------------------------------------------------- text


def _listing_text(rng: np.random.Generator, spec: CategorySpec, category: str, location: str) -> tuple[str, str]:
    """A title and a few sentences; a share are vague, as real adverts often are."""
    weak = rng.random() < WEAK_TEXT_RATE
    noun = _slot_word(rng, spec, weak)
    title = _title(rng, spec, noun, weak)
    n_sentences = int(rng.integers(2, 5))
    sentences = [_sentence(rng, spec, weak) for _ in range(n_sentences)]
    if rng.random() < 0.1:
        sentences.append(_posted_by(rng, category, location))
    return title, " ".join(sentences)


def _slot_word(rng: np.random.Generator, spec: CategorySpec, weak: bool) -> str:
    if weak:
        return _pick(rng, FILLER_WORDS)
    source = _pick(rng, tuple(TEXT_SLOT_WEIGHTS), p=tuple(TEXT_SLOT_WEIGHTS.values()))
    if source == "own":
        return _pick(rng, spec.nouns)
    if source == "brand":
        return f"{_pick(rng, spec.brands)} {_pick(rng, spec.nouns)}"
    if source == "family":
        return _pick(rng, FAMILY_WORDS[spec.family])
    if source == "other":
        return _pick(rng, _pick(rng, CATEGORIES).nouns)
    return _pick(rng, FILLER_WORDS)


def _title(rng: np.random.Generator, spec: CategorySpec, noun: str, weak: bool) -> str:
    style = int(rng.integers(4))
    if style == 0:
        return f"{_pick(rng, ADJECTIVES)} {noun}"
    if style == 1 and not weak:
        return f"{_pick(rng, spec.brands)} {noun}"
    if style == 2:
        return f"{noun} {_slot_word(rng, spec, weak)}".capitalize()
    return noun.capitalize()


def _sentence(rng: np.random.Generator, spec: CategorySpec, weak: bool) -> str:
    if weak or rng.random() < GENERIC_SENTENCE_RATE:
        return _pick(rng, GENERIC_SENTENCES)
    template = _pick(rng, NOUN_TEMPLATES)
    noun = _slot_word(rng, spec, weak)
    return template.format(
        Adj=_pick(rng, ADJECTIVES), noun=noun, Noun=noun.capitalize(), noun2=_slot_word(rng, spec, weak),
        cond=_pick(rng, CONDITIONS), Brand=_pick(rng, spec.brands),
    )


def _posted_by(rng: np.random.Generator, category: str, location: str) -> str:
    """Gumtree's own boilerplate, which repeats the category path inside the description."""
    parts = category.split(" / ")
    where = ", ".join(parts[1:]) or parts[0]
    town = location.split(",")[0]
    day = int(rng.integers(20, 29))
    return f"Posted by {_pick(rng, PEOPLE)} in {where} in {town}. {day} February 2022"


def _pick(rng: np.random.Generator, options: Sequence[Any], p: Sequence[float] | None = None) -> Any:
    if p is None:
        return options[int(rng.integers(len(options)))]
    return options[int(rng.choice(len(options), p=p))]


# ---------------------------------------------------------------- product quirks


def _assign_product_quirks(products: list[Product], params: SampleParams,
                           rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Put each quirk on its own listings so a test can count it exactly."""
    counts = _product_quirk_counts(params)
    pool = [products[i] for i in rng.permutation(len(products))]
    quirks: dict[str, dict[str, Any]] = {}
    for name in PRODUCT_QUIRKS:
        chosen, pool = pool[: counts[name]], pool[counts[name]:]
        chosen.sort(key=lambda product: product.index)
        quirks[name] = _QUIRK_APPLIERS[name](chosen, params, rng)
    return quirks


def _quirk_record(ids: Iterable[str], unit: str, fraction: float | None,
                  details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    ids = list(ids)
    record: dict[str, Any] = {"count": len(ids), "unit": unit, "fraction": fraction, "ids": ids}
    if details is not None:
        record["details"] = dict(details)
    return record


def _apply_empty_description(chosen: list[Product], params: SampleParams, rng: np.random.Generator) -> dict:
    for product in chosen:
        product.description = ""
    return _quirk_record((p.product_id for p in chosen), "product", params.quirks["empty_description"])


def _apply_bad_price(chosen: list[Product], params: SampleParams, rng: np.random.Generator) -> dict:
    details = {}
    for i, product in enumerate(chosen):
        product.price = BAD_PRICES[i % len(BAD_PRICES)]
        details[product.product_id] = product.price
    return _quirk_record(details, "product", params.quirks["bad_price"], details)


def _apply_carriage_return(chosen: list[Product], params: SampleParams, rng: np.random.Generator) -> dict:
    """Every other one stays free of commas and quotes, so its \r lands outside CSV quotes."""
    details = {}
    for i, product in enumerate(chosen):
        outside = i % 2 == 0
        product.description = _with_carriage_returns(product.description, rng, outside)
        details[product.product_id] = "outside_quotes" if outside else "inside_quotes"
    return _quirk_record(details, "product", params.quirks["carriage_return"], details)


def _with_carriage_returns(description: str, rng: np.random.Generator, outside_quotes: bool) -> str:
    sentences = [s for s in description.split(". ") if s] or ["Collection only"]
    if len(sentences) == 1:
        sentences.append("Message me")
    text = "\r".join(sentences)
    if outside_quotes:
        return text.replace(",", "").replace('"', "")
    return text if "," in text else f"{text}\rThanks, {_pick(rng, PEOPLE)}"


def _apply_category_without_separator(chosen: list[Product], params: SampleParams, rng: np.random.Generator) -> dict:
    for product in chosen:
        product.category = product.root
    return _quirk_record((p.product_id for p in chosen), "product", params.quirks["category_without_separator"])


def _apply_no_image(chosen: list[Product], params: SampleParams, rng: np.random.Generator) -> dict:
    for product in chosen:
        product.n_images = 0
    return _quirk_record((p.product_id for p in chosen), "product", params.quirks["no_image"])


def _apply_label_noise(chosen: list[Product], params: SampleParams, rng: np.random.Generator) -> dict:
    """The listing keeps its category but its words, price and photos come from another root."""
    details = {}
    for product in chosen:
        others = [spec.root for spec in CATEGORIES if spec.root != product.root]
        content_root = _pick(rng, others)
        redrawn = _make_product(product.index, product.root, content_root, params, rng)
        product.content_root = content_root
        product.name, product.description, product.price = redrawn.name, redrawn.description, redrawn.price
        product.location = redrawn.location
        details[product.product_id] = content_root
    return _quirk_record(details, "product", params.label_noise, details)


_QUIRK_APPLIERS = {
    "empty_description": _apply_empty_description,
    "bad_price": _apply_bad_price,
    "carriage_return": _apply_carriage_return,
    "category_without_separator": _apply_category_without_separator,
    "no_image": _apply_no_image,
    "label_noise": _apply_label_noise,
}


def _insert_duplicates(products: list[Product], quirks: dict[str, dict[str, Any]], params: SampleParams,
                       rng: np.random.Generator) -> list[Product]:
    """Re-posts: same text, price, place and date under a new id, later in the file."""
    n_duplicates = quirk_count(params.quirks["duplicate_listing"], params.n_products)
    clean_ids = _untouched_ids(products, quirks)
    sources_ids = [clean_ids[i] for i in rng.permutation(len(clean_ids))[:n_duplicates]]
    by_id = {product.product_id: product for product in products}
    ordered = list(products)
    details = {}
    for source_id in sorted(sources_ids, key=lambda pid: by_id[pid].index):
        source = by_id[source_id]
        duplicate = Product(**{**source.__dict__, "product_id": _uuid(rng), "duplicate_of": source_id,
                               "image_ids": []})
        position = int(rng.integers(ordered.index(source) + 1, len(ordered) + 1))
        ordered.insert(position, duplicate)
        details[duplicate.product_id] = source_id
    ids = [product.product_id for product in ordered if product.product_id in details]
    quirks["duplicate_listing"] = _quirk_record(ids, "product", params.quirks["duplicate_listing"],
                                                {pid: details[pid] for pid in ids})
    return ordered


# ---------------------------------------------------------------- images


def _plan_images(ordered: list[Product], params: SampleParams, rng: np.random.Generator) -> list[ImageJob]:
    """Rows of Images.csv in file order; a re-post reuses its source's photo bytes."""
    jobs: list[ImageJob] = []
    sources: dict[str, list[str]] = {}
    for product in ordered:
        for k in range(product.n_images):
            job = ImageJob(
                image_id=_uuid(rng), product_id=product.product_id, content_root=product.content_root,
                seed_key=(params.seed, 1, product.index, k), create_time=product.create_time,
                size=_photo_size(rng, params),
            )
            if product.duplicate_of is not None:
                job.kind, job.copy_of = "copy", sources[product.duplicate_of][k]
            product.image_ids.append(job.image_id)
            jobs.append(job)
        sources[product.product_id] = product.image_ids
    return jobs


def _photo_size(rng: np.random.Generator, params: SampleParams) -> tuple[int, int]:
    width, height = (int(v) for v in rng.integers(params.image_size_min, params.image_size_max + 1, size=2))
    if width == height:
        height += 1 if height < params.image_size_max else -1
    return width, height


def _assign_image_quirks(ordered: list[Product], jobs: list[ImageJob], product_quirks: Mapping[str, Any],
                         params: SampleParams, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Broken and unusual files, each on its own still-clean listing."""
    clean = set(_untouched_ids(ordered, product_quirks))
    candidates = [job for job in jobs if job.product_id in clean and job.kind == "normal"]
    first_per_product = list({job.product_id: job for job in reversed(candidates)}.values())[::-1]
    picks = [first_per_product[i] for i in rng.permutation(len(first_per_product))]
    n_odd = quirk_count(params.quirks["odd_image_mode"], params.n_products)
    odd, singles = picks[:n_odd], picks[n_odd: n_odd + len(SINGLE_FILE_QUIRKS)]
    quirks = {"odd_image_mode": _apply_odd_modes(sorted(odd, key=jobs.index), params)}
    for name, job in zip(SINGLE_FILE_QUIRKS, singles):
        job.kind = {"zero_byte_image": "zero_byte", "truncated_image": "truncated",
                    "png_as_jpg": "png", "missing_image_file": "missing"}[name]
        quirks[name] = _quirk_record([job.image_id], "image", None, {job.image_id: job.product_id})
    quirks["orphan_image_file"] = _add_orphan(jobs, params, rng)
    return quirks


def _untouched_ids(products: list[Product], quirks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Listings (with photos) that carry no quirk yet, in file order: re-posts count for both ends."""
    touched = {pid for record in quirks.values() for pid in record["ids"]}
    touched |= {p.duplicate_of for p in products if p.duplicate_of is not None}
    return [p.product_id for p in products if p.product_id not in touched and p.n_images > 0]


def _apply_odd_modes(chosen: list[ImageJob], params: SampleParams) -> dict[str, Any]:
    """Cycle through the modes, with extreme aspect ratios, as phone exports and scans produce."""
    details = {}
    modes = tuple(ODD_MODE_FORMATS)
    for i, job in enumerate(chosen):
        job.kind, job.mode = "odd_mode", modes[i % len(modes)]
        long_side = params.image_size_max - (1 - params.image_size_max % 2)  # an odd number of pixels
        short_side = params.image_size_min + (1 - params.image_size_min % 2)
        job.size = (long_side, short_side) if i % 2 == 0 else (short_side, long_side)
        details[job.image_id] = {"product_id": job.product_id, "mode": job.mode,
                                 "format": ODD_MODE_FORMATS[job.mode], "size": list(job.size)}
    return _quirk_record(details, "image", params.quirks["odd_image_mode"], details)


def _add_orphan(jobs: list[ImageJob], params: SampleParams, rng: np.random.Generator) -> dict[str, Any]:
    orphan = ImageJob(
        image_id=_uuid(rng), product_id=None, content_root=_pick(rng, CATEGORIES).root,
        seed_key=(params.seed, 2, 0, 0), create_time=_BASE_DATE.isoformat(), kind="orphan",
        size=_photo_size(rng, params), in_csv=False,
    )
    jobs.append(orphan)
    return _quirk_record([orphan.image_id], "file", None)


def _write_images(folder: Path, jobs: list[ImageJob], params: SampleParams) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, bytes] = {}
    for job in jobs:
        data = written[job.copy_of] if job.kind == "copy" else _encode_job(job)
        written[job.image_id] = data
        if job.kind != "missing":
            (folder / f"{job.image_id}.jpg").write_bytes(data)


def _encode_job(job: ImageJob) -> bytes:
    if job.kind == "zero_byte":
        return b""
    photo = render_photo(np.random.default_rng(list(job.seed_key)), _spec(job.content_root), job.size)
    if job.kind == "png":
        return _encode(photo, "PNG")
    if job.kind == "odd_mode":
        return _encode(_convert_mode(photo, job.mode), ODD_MODE_FORMATS[job.mode])
    data = _encode(photo, "JPEG")
    return data[: len(data) // 2] if job.kind == "truncated" else data


def _convert_mode(photo: Image.Image, mode: str) -> Image.Image:
    if mode == "RGBA":
        converted = photo.convert("RGBA")
        alpha = np.linspace(255, 96, photo.height, dtype=np.uint8)[:, None].repeat(photo.width, axis=1)
        converted.putalpha(Image.fromarray(alpha, "L"))
        return converted
    if mode == "P":
        return photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return photo.convert(mode)


def _encode(image: Image.Image, image_format: str) -> bytes:
    """Fixed encoder settings and no metadata, so bytes are identical run to run."""
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    elif image_format == "WEBP":
        image.save(buffer, "WEBP", lossless=True, quality=50, method=0)
    else:
        image.save(buffer, image_format)
    return buffer.getvalue()


def render_photo(rng: np.random.Generator, spec: CategorySpec, size: tuple[int, int]) -> Image.Image:
    """A product 'photo': the root's shape, palette and texture, usually, among clutter."""
    width, height = size
    canvas = _background(rng, width, height)
    for _ in range(int(rng.integers(0, 4))):
        _draw_clutter(rng, canvas)
    shape = spec.shape if rng.random() < SHAPE_KEEP else _pick(rng, SHAPES)
    colour = _jitter(rng, _pick(rng, spec.palette)) if rng.random() < PALETTE_KEEP else _random_colour(rng)
    texture = spec.texture if rng.random() < TEXTURE_KEEP else _pick(rng, TEXTURES)
    side = min(width, height) * rng.uniform(0.45, 0.9)
    centre = (rng.uniform(side / 2, width - side / 2), rng.uniform(side / 2, height - side / 2))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(_shape_points(shape, centre, side, rng.uniform(0, 360)), fill=255)
    canvas.paste(_texture(rng, texture, colour, width, height, side), (0, 0), mask)
    if rng.random() < 0.3:
        _draw_clutter(rng, canvas)
    return canvas


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    top, bottom = _random_colour(rng), _random_colour(rng)
    if rng.random() < 0.5:
        return Image.new("RGB", (width, height), top)
    blend = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    column = np.array(top, np.float32) * (1 - blend) + np.array(bottom, np.float32) * blend
    return Image.fromarray(column.astype(np.uint8), "RGB").resize((width, height), Image.Resampling.NEAREST)


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    width, height = canvas.size
    side = min(width, height) * rng.uniform(0.06, 0.22)
    centre = (rng.uniform(0, width), rng.uniform(0, height))
    points = _shape_points(_pick(rng, SHAPES), centre, side, rng.uniform(0, 360))
    ImageDraw.Draw(canvas).polygon(points, fill=_random_colour(rng))


def _random_colour(rng: np.random.Generator) -> RGB:
    red, green, blue = (int(v) for v in rng.integers(0, 256, size=3))
    return red, green, blue


def _jitter(rng: np.random.Generator, colour: RGB, amount: int = 30) -> RGB:
    """Palette colours vary a little, as lighting and cameras do."""
    red, green, blue = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)
    return red, green, blue


def _shape_points(shape: str, centre: tuple[float, float], side: float, angle: float) -> list[tuple[float, float]]:
    unit = _UNIT_SHAPES[shape]
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    half = side / 2
    return [(centre[0] + half * (x * cos - y * sin), centre[1] + half * (x * sin + y * cos)) for x, y in unit]


def _regular(n: int, radius: float = 1.0, offset: float = 0.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(2 * math.pi * i / n + offset), radius * math.sin(2 * math.pi * i / n + offset))
            for i in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.0, -math.pi / 2), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return [point for pair in zip(outer, inner) for point in pair]


_UNIT_SHAPES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "star": _star(),
    "diamond": [(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)],
    "triangle": _regular(3, 1.0, -math.pi / 2),
    "circle": _regular(36),
    "hexagon": _regular(6),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
}


def _texture(rng: np.random.Generator, kind: str, colour: RGB, width: int, height: int,
             side: float) -> Image.Image:
    """The fill of the main object; the period follows the object's size so the pattern
    survives the downscaling a model applies, and it varies so it is not a fixed template."""
    base = np.array(colour, np.float32)
    other = np.clip(base * 0.45 + (255 - base) * 0.1, 0, 255)
    if kind == "solid":
        return Image.new("RGB", (width, height), colour)
    if kind == "noise":
        grain = max(1, int(side / 24))
        small = rng.normal(0, 55, size=(height // grain + 1, width // grain + 1, 1)).astype(np.float32)
        noisy = Image.fromarray(np.clip(base + small, 0, 255).astype(np.uint8), "RGB")
        return noisy.resize((noisy.width * grain, noisy.height * grain), Image.Resampling.NEAREST).crop(
            (0, 0, width, height))
    on = _pattern(rng, kind, width, height, max(3.0, side * float(rng.uniform(0.12, 0.22))))
    pixels = np.where(on[..., None], base.astype(np.uint8), other.astype(np.uint8))
    return Image.fromarray(pixels, "RGB")


def _pattern(rng: np.random.Generator, kind: str, width: int, height: int, period: float) -> np.ndarray:
    """A boolean on/off mask; 1-D coordinates broadcast so only one full-size array is built."""
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    if kind == "stripes":
        theta = rng.uniform(0, math.pi)
        return ((xs * math.cos(theta) + ys * math.sin(theta)) // period) % 2 == 0
    if kind == "dots":
        return ((xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2) > (period * 0.3) ** 2
    return ((xs // period + ys // period) % 2) == 0  # checker


# ---------------------------------------------------------------- CSV


def _csv_field(value: str) -> str:
    """Quote only on comma, quote or newline, like the real export: a lone \r stays bare."""
    if any(char in value for char in (",", '"', "\n")):
        return '"' + value.replace('"', '""') + '"'
    return value


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]], line_end: str) -> None:
    """Hand-written because the csv module would quote every \r, hiding the real file's quirk."""
    lines = [",".join(_csv_field(cell) for cell in header)]
    lines.extend(",".join(_csv_field(cell) for cell in row) for row in rows)
    path.write_bytes((line_end.join(lines) + line_end).encode("utf-8"))


def _row_indices(n: int, rng: np.random.Generator) -> list[int]:
    """The real index column has gaps (rows dropped upstream); mimic that."""
    steps = 1 + (rng.random(n) < 0.02).astype(int)
    return [int(v) for v in np.cumsum(steps) - steps[0]]


def _write_products_csv(path: Path, ordered: list[Product], rng: np.random.Generator) -> None:
    rows = ([str(index), p.product_id, p.name, p.category, p.description, p.price, p.location, p.create_time]
            for index, p in zip(_row_indices(len(ordered), rng), ordered))
    _write_csv(path, PRODUCT_COLUMNS, rows, PRODUCTS_LINE_END)


def _write_images_csv(path: Path, jobs: list[ImageJob], rng: np.random.Generator) -> None:
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"))
    listed = [job for job in jobs if job.in_csv]
    rows = ([str(i), job.image_id, job.product_id or "", f"{BUCKET_URL}{job.image_id}.jpg",
             "".join(rng.choice(alphabet, size=16)), job.create_time] for i, job in enumerate(listed))
    _write_csv(path, IMAGE_COLUMNS, rows, IMAGES_LINE_END)


# ---------------------------------------------------------------- manifest


def _build_manifest(folder: Path, params: SampleParams, ordered: list[Product], jobs: list[ImageJob],
                    quirks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything a test needs to assert on the sample without re-deriving it."""
    images = sorted((folder / "images").iterdir())
    per_root = {root: sum(p.root == root for p in ordered) for root in class_names()}
    by_n_images: dict[str, int] = {}
    for product in ordered:
        by_n_images[str(product.n_images)] = by_n_images.get(str(product.n_images), 0) + 1
    return {
        "generator": "pipeline_steps.sample_data",
        "format_version": FORMAT_VERSION,
        "params": params.as_dict(),
        "n_products": len(ordered),
        "n_images": sum(job.in_csv for job in jobs),
        "classes": class_names(),
        "counts": {
            "products": len(ordered),
            "unique_listings": sum(p.duplicate_of is None for p in ordered),
            "image_rows": sum(job.in_csv for job in jobs),
            "image_files": len(images),
            "products_per_root": per_root,
            "products_by_n_images": dict(sorted(by_n_images.items())),
        },
        "quirks": {name: quirks[name] for name in sorted(quirks)},
        "markers": {
            "bad_price_values": list(BAD_PRICES),
            "odd_image_formats": dict(ODD_MODE_FORMATS),
            "read_csv": {"Products.csv": {"lineterminator": "\n"}, "Images.csv": {}},
            "line_endings": {"Products.csv": "LF", "Images.csv": "CRLF"},
        },
        "sha256": {
            "Products.csv": file_sha256(folder / "Products.csv"),
            "Images.csv": file_sha256(folder / "Images.csv"),
            "images": _folder_digest(images),
        },
    }


def _folder_digest(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
