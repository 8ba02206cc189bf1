#!/usr/bin/env python
"""Generate explainers/data/tag_map.json: everyday tags -> sets of ImageNet-1k classes.

The tables below are written by hand from the ImageNet-1k class list (its WordNet hierarchy) and
checked here against torchvision's 1000 class names: every class is named (never only numbered),
each name must exist exactly once, whole ranges are given by their first and last names and their
sizes are asserted (dog = 118 breeds, bird = 59 classes ...). The JSON stores names AND indices, and
the 1000 names themselves, so that ``explainers.tags`` needs no torchvision at run time.

Choices (also in the JSON's ``notes``):
- "cat" is the 5 domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian). The big cats (cougar,
  lynx, leopard, snow leopard, jaguar, lion, tiger, cheetah) are the separate tag "big cat";
  "Madagascar cat" (a lemur) is in neither.
- "horse" is "sorrel", the only horse class of ImageNet-1k. Zebra is its own tag; "horse cart" is not
  a horse (it is a cart, often without a horse in the picture).
- "sheep" is ram + bighorn (WordNet: domestic and wild sheep); "cow" is ox only (water buffalo and
  bison are bovines, under the tag "bovine").
- "car" is the WordNet car subtree: ambulance, beach wagon, cab, convertible, jeep, limousine, minivan,
  Model T, racer, sports car. Police van and moving van are vans, i.e. trucks (tag "truck"/"van").
- "motorcycle"/"motorbike": ImageNet-1k has no motorcycle class; moped and motor scooter stand in.
- "boat" is every watercraft class (boats and ships, as in PASCAL VOC and COCO), not "wreck".
- "train" is locomotives and rail cars; a streetcar (tram) is its own tag, as PASCAL VOC excludes trams.
- "aeroplane" is airliner, warplane and "wing" (ImageNet's "wing" photos are of aircraft).
- "potted plant" is "pot" (ImageNet's "pot" is the flowerpot, WordNet n03991062).
- "tv"/"tvmonitor" is television, monitor, screen (VOC's tvmonitor includes computer monitors).
- Nearest classes where ImageNet-1k has no class of that name but one fits (NEAREST, each with its
  reason and what the classifier gives on the dev photos tagged with it): oven -> stove (not "Dutch
  oven", a pot), donut -> bagel, sandwich -> cheeseburger + hotdog, wine glass -> goblet + red wine,
  sign / stop sign -> street sign, flower -> daisy + yellow lady's slipper.
- Not in ImageNet-1k at all, so refused with an explanation (see UNSUPPORTED): person (and its parts,
  face and body), giraffe, knife, fork, ...; "stuff" regions (sky, grass, tree, road, water, ...) too.
- "kite" is the toy (COCO's kite), which ImageNet-1k lacks: refused. ImageNet's class "kite" is the
  bird of prey: the tag "kite bird" (or "21") gives it.
- A tag spelled like an ImageNet name resolves to a set that holds that class ("cup" -> cup + coffee
  mug, "zebra" -> zebra), except those in OVERRIDES ("plane" is an aeroplane, not the carpenter's
  tool; "kite" is refused, above). Other ImageNet names keep their ImageNet sense: "crane" is the
  machine, "mouse" the computer mouse. Names are matched case-insensitively; "Cardigan" (the corgi, 264) and
  "cardigan" (the sweater, 474) differ only by case, so that word needs its exact spelling.

Run:  python scripts/make_tag_map.py [--out PATH] [--check]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "explainers" / "data" / "tag_map.json"

# A range is ("first name", "last name", expected size); anything else is a single ImageNet name.
Range = tuple[str, str, int]

# Nearest classes: tags ImageNet-1k has no class of that name for, but where one fits, with the reason.
# "dev" is what efficientnet_lite0 (224 px, softmax) gives for the class set on the development photos
# (coco128_dev, MSRC-v2 split_dev) tagged with it, against the other photos of the same set: the
# median probability (tagged vs others) and the AUC (chance that a tagged photo outranks another).
# tests/test_tags.py checks these on the same photos.
NEAREST: dict[str, dict] = {
    "oven": {"classes": ["stove"],
             "why": "WordNet's 'stove' (n04330267) is the kitchen range that COCO's ovens belong to; 'Dutch "
                    "oven' is a cast-iron pot, not an appliance. dev (5 COCO photos with an oven): stove median "
                    "0.05 vs 0.0001, AUC 0.99; Dutch oven median 0.0003, AUC 0.68."},
    "donut": {"classes": ["bagel"],
              "why": "ImageNet-1k has no doughnut; a bagel is the nearest ring-shaped baked good. dev (2 COCO "
                     "photos): median 0.06 vs 0.0001, AUC 0.98."},
    "sandwich": {"classes": ["cheeseburger", "hotdog"],
                 "why": "ImageNet-1k's sandwiches (WordNet) are 'cheeseburger' and 'hotdog'; COCO labels burgers "
                        "and subs as sandwiches. dev (2 COCO photos): median 0.57 vs 0.0002, AUC 0.99 (the "
                        "cheeseburger alone: 0.008)."},
    "wine glass": {"classes": ["goblet", "red wine"],
                   "why": "WordNet's 'goblet' is a drinking glass with a base and stem, i.e. a wine glass, and the "
                          "'red wine' photos show one filled. Weak on cluttered tables, like 'cup': dev (5 COCO "
                          "photos) median 0.0007 vs 0.0002, AUC 0.77."},
    "sign": {"classes": ["street sign"],
             "why": "MSRC's signs and COCO's stop signs are street signs. dev: MSRC (23 photos) median 0.55 vs "
                    "0.0002, AUC 1.00; COCO stop signs (2 photos) median 0.006 vs 0.0001, AUC 0.93."},
    "flower": {"classes": ["daisy", "yellow lady's slipper"],
               "why": "ImageNet-1k's only flower classes (a daisy, an orchid). dev (25 MSRC photos): median 0.04 "
                      "vs 0.0003, AUC 0.99; adding 'rapeseed' (fields of yellow flowers) fires on grass too "
                      "(AUC 0.96)."},
}

GROUPS: dict[str, list] = {
    # --- PASCAL VOC 2012 (20) and COCO (80) classes that ImageNet-1k covers ---------------------
    "dog": [("Chihuahua", "Mexican hairless", 118)],
    "cat": ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"],
    "bird": [("cock", "great grey owl", 18), ("black grouse", "black swan", 21), ("white stork", "albatross", 20)],
    "horse": ["sorrel"],
    "sheep": ["ram", "bighorn"],
    "cow": ["ox"],
    "elephant": ["tusker", "Indian elephant", "African elephant"],
    "bear": ["brown bear", "American black bear", "ice bear", "sloth bear"],
    "zebra": ["zebra"],
    "aeroplane": ["airliner", "warplane", "wing"],
    "bicycle": ["mountain bike", "bicycle-built-for-two"],
    "motorcycle": ["moped", "motor scooter"],
    "car": ["ambulance", "beach wagon", "cab", "convertible", "jeep", "limousine", "minivan", "Model T",
            "racer", "sports car"],
    "bus": ["school bus", "trolleybus", "minibus"],
    "truck": ["pickup", "trailer truck", "tow truck", "garbage truck", "fire engine", "moving van", "police van"],
    "train": ["bullet train", "electric locomotive", "steam locomotive", "freight car", "passenger car"],
    "boat": ["aircraft carrier", "canoe", "catamaran", "container ship", "fireboat", "gondola", "lifeboat",
             "liner", "pirate", "schooner", "speedboat", "submarine", "trimaran", "yawl"],
    "bottle": ["beer bottle", "pill bottle", "pop bottle", "water bottle", "wine bottle"],
    "chair": ["barber chair", "folding chair", "rocking chair", "throne"],
    "dining table": ["dining table"],
    "potted plant": ["pot"],
    "sofa": ["studio couch"],
    "tv": ["television", "monitor", "screen"],
    "traffic light": ["traffic light"],
    "parking meter": ["parking meter"],
    "bench": ["park bench"],
    "backpack": ["backpack"],
    "umbrella": ["umbrella"],
    "handbag": ["purse"],
    "tie": ["bow tie", "Windsor tie"],
    "skis": ["ski"],
    "sports ball": ["baseball", "basketball", "croquet ball", "golf ball", "ping-pong ball", "rugby ball",
                    "soccer ball", "tennis ball", "volleyball"],
    "tennis racket": ["racket"],
    "cup": ["cup", "coffee mug"],
    "spoon": ["wooden spoon"],
    "bowl": ["mixing bowl", "soup bowl"],
    "banana": ["banana"],
    "apple": ["Granny Smith"],
    "orange": ["orange"],
    "broccoli": ["broccoli"],
    "hot dog": ["hotdog"],
    "pizza": ["pizza"],
    "bed": ["four-poster", "crib", "cradle", "bassinet"],
    "toilet": ["toilet seat"],
    "laptop": ["laptop", "notebook"],
    "mouse": ["mouse"],
    "remote": ["remote control"],
    "keyboard": ["computer keyboard", "space bar"],
    "cell phone": ["cellular telephone"],
    "microwave": ["microwave"],
    "toaster": ["toaster"],
    "sink": ["washbasin"],
    "refrigerator": ["refrigerator"],
    "book": ["book jacket", "comic book"],
    "clock": ["analog clock", "digital clock", "wall clock"],
    "vase": ["vase"],
    "teddy bear": ["teddy"],
    **{tag: entry["classes"] for tag, entry in NEAREST.items()},   # COCO / MSRC tags by nearest classes
    # --- a few other everyday groups --------------------------------------------------------------
    "big cat": ["cougar", "lynx", "leopard", "snow leopard", "jaguar", "lion", "tiger", "cheetah"],
    "wolf": ["timber wolf", "white wolf", "red wolf"],
    "fox": ["red fox", "kit fox", "Arctic fox", "grey fox"],
    "bovine": ["ox", "water buffalo", "bison"],
    "pig": ["hog", "wild boar", "warthog"],
    "rabbit": ["wood rabbit", "hare", "Angora"],
    "monkey": [("guenon", "squirrel monkey", 13)],
    "corgi": ["Pembroke", "Cardigan"],
    "ape": ["orangutan", "gorilla", "chimpanzee", "gibbon", "siamang"],
    "van": ["minivan", "moving van", "police van"],
    "tram": ["streetcar"],
    "duck": ["drake", "red-breasted merganser"],
    "chicken": ["cock", "hen"],
    "penguin": ["king penguin"],
    "owl": ["great grey owl"],
    "eagle": ["bald eagle"],
    "snake": [("thunder snake", "sidewinder", 17)],
    "turtle": [("loggerhead", "box turtle", 5)],
    "lizard": [("banded gecko", "Komodo dragon", 11)],
    "spider": [("black and gold garden spider", "wolf spider", 6)],
    "butterfly": [("admiral", "lycaenid", 6)],
    "shark": ["great white shark", "tiger shark", "hammerhead"],
    "whale": ["grey whale", "killer whale"],
    "camel": ["Arabian camel"],
    "guitar": ["acoustic guitar", "electric guitar"],
    "piano": ["grand piano", "upright"],
    "computer": ["desktop computer", "laptop", "notebook", "hand-held computer"],
    "telephone": ["cellular telephone", "dial telephone", "pay-phone"],
    "glasses": ["sunglass", "sunglasses"],
}

# Expected sizes of the groups that the task statement fixes (others are checked by their ranges).
EXPECTED_SIZES = {"dog": 118, "cat": 5, "bird": 59, "horse": 1, "bus": 3, "car": 10, "monkey": 13}

# Alias -> group tag (or ImageNet name). Applied after normalisation (lower case, single spaces).
SYNONYMS: dict[str, str] = {
    # PASCAL VOC spellings
    "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv", "motorbike": "motorcycle",
    # COCO spellings
    "airplane": "aeroplane", "couch": "sofa", "dining-table": "dining table",
    "cellphone": "cell phone", "tennis racquet": "tennis racket",
    # everyday words
    "aircraft": "aeroplane", "plane": "aeroplane", "jet": "aeroplane",
    "kitty": "cat", "kitten": "cat", "house cat": "cat", "domestic cat": "cat", "pussycat": "cat",
    "puppy": "dog", "pup": "dog", "doggy": "dog", "doggie": "dog", "hound": "dog",
    "pony": "horse", "stallion": "horse", "mare": "horse", "foal": "horse", "colt": "horse",
    "lamb": "sheep", "ewe": "sheep", "cattle": "cow", "calf": "cow", "bull": "cow",
    "automobile": "car", "auto": "car", "taxi": "cab", "race car": "racer",
    "bike": "bicycle", "tandem": "bicycle-built-for-two", "scooter": "motor scooter",
    "lorry": "truck", "fire truck": "fire engine", "trolley": "tram",
    "ship": "boat", "sofa bed": "studio couch", "settee": "sofa",
    "television set": "tv", "tv monitor": "tv", "computer monitor": "monitor", "display": "tv",
    "flowerpot": "potted plant", "houseplant": "potted plant", "plant pot": "potted plant",
    "polar bear": "ice bear", "panda": "giant panda", "red panda": "lesser panda",
    "mug": "coffee mug", "coffee cup": "cup", "wine": "red wine",
    "big cats": "big cat", "wild cat": "big cat", "wildcat": "big cat",
    "swine": "pig", "boar": "wild boar", "bunny": "rabbit",
    "mobile phone": "cell phone", "smartphone": "cell phone", "phone": "telephone",
    "tortoise": "turtle", "fridge": "refrigerator",
    "computer mouse": "mouse", "notebook computer": "laptop", "ball": "sports ball",
    "table": "dining table",
    "doughnut": "donut", "stop sign": "sign", "road sign": "sign", "traffic sign": "sign",
    "wineglass": "wine glass", "burger": "cheeseburger", "hamburger": "cheeseburger",
    "kite bird": "kite",
}

# A tag spelled like an ImageNet name normally resolves to a set holding that class ("cup" -> cup +
# coffee mug, "zebra" -> zebra). Tags listed here deliberately resolve to a set WITHOUT it.
OVERRIDES: dict[str, str] = {
    "plane": "ImageNet class 726 'plane' is the carpenter's tool; the tag 'plane' means an aeroplane",
    "kite": "ImageNet class 21 'kite' is the bird of prey; the tag 'kite' means the toy (COCO's kite), which "
            "ImageNet-1k lacks, so it is refused; 'kite bird' is the bird",
}

# Tags that ImageNet-1k cannot answer: refused (RefusedTagError) with this explanation, a sentence
# that ends the message "tag 'X' has no class in the ImageNet-1k classifier: ...". "see 'X'" borrows X's.
UNSUPPORTED: dict[str, str] = {
    "person": "ImageNet-1k has no person class (only 'scuba diver', 'groom', 'ballplayer'); "
              "list classes explicitly (predicted_values) or use a detector",
    "people": "see 'person'", "human": "see 'person'", "man": "see 'person'", "woman": "see 'person'",
    "child": "see 'person'",
    "face": "a face is part of a person, and ImageNet-1k has no person class",
    "body": "a body is a person, and ImageNet-1k has no person class",
    "giraffe": "ImageNet-1k has no giraffe class",
    "fire hydrant": "ImageNet-1k has no fire hydrant class",
    "suitcase": "ImageNet-1k has no suitcase class ('mailbag' does not fire on suitcases)",
    "frisbee": "ImageNet-1k has no frisbee class",
    "snowboard": "ImageNet-1k has no snowboard class",
    "baseball bat": "ImageNet-1k has no baseball bat class; its 'baseball' is the ball, which fires on the "
                    "whole baseball scene rather than on the bat",
    "baseball glove": "ImageNet-1k has no baseball glove class; its 'baseball' is the ball, which fires on "
                      "the whole baseball scene rather than on the glove",
    "skateboard": "ImageNet-1k has no skateboard class", "surfboard": "ImageNet-1k has no surfboard class",
    "fork": "ImageNet-1k has no fork class",
    "knife": "ImageNet-1k has no table knife class; 'cleaver' (a butcher's knife) gives only 0.002 on the dev "
             "photos with a knife",
    "carrot": "ImageNet-1k has no carrot class",
    "cake": "ImageNet-1k has no cake class; 'trifle' (a dessert in a glass bowl) gives only 0.0006 on the dev "
            "photos with a cake",
    "scissors": "ImageNet-1k has no scissors class",
    "hair drier": "ImageNet-1k has no hair drier class ('hand blower' is the wall-mounted hand dryer)",
    "toothbrush": "ImageNet-1k has no toothbrush class",
    "kite": "its class 'kite' (21) is the bird of prey, and it has no class for the toy kite; tag 'kite bird' "
            "for the bird",
    # "stuff": regions without a shape of their own (MSRC-v2's and COCO's most common)
    "sky": "ImageNet-1k names objects, not regions such as sky; it has no sky class",
    "grass": "ImageNet-1k names objects, not regions such as grass; it has no grass class",
    "tree": "ImageNet-1k has no tree class (only fruits, nuts and a few plants)",
    "building": "ImageNet-1k has only particular buildings (church, palace, monastery, boathouse ...), no building "
                "class; list the ones you want explicitly (predicted_values)",
    "road": "ImageNet-1k names objects, not regions such as road; it has no road class",
    "water": "ImageNet-1k has no water class ('lakeside', 'seashore' are whole scenes)",
    "sea": "see 'water'", "river": "see 'water'",
    "mountain": "ImageNet-1k has no mountain class ('alp', 'volcano' are whole scenes)",
    "sand": "ImageNet-1k names objects, not regions such as sand; it has no sand class",
    "snow": "ImageNet-1k names objects, not regions such as snow; it has no snow class",
    "wall": "ImageNet-1k has no wall class (only 'stone wall', a field boundary)",
    "floor": "ImageNet-1k names objects, not regions such as floor; it has no floor class",
    "ceiling": "ImageNet-1k names objects, not regions such as ceiling; it has no ceiling class",
}

NOTES = [" ".join(line.strip("- ").split()) for line in __doc__.split("Choices (also in the JSON's ``notes``):")[1]
         .split("Run:")[0].strip().split("\n- ")]


def normalise(tag: str) -> str:
    """The lookup form of a tag: lower case, '_' as space, single spaces, no outer space."""
    return " ".join(tag.replace("_", " ").lower().split())


def build(categories: list[str]) -> dict:
    """Check the tables against `categories` (the 1000 ImageNet names) and return the JSON document."""
    assert len(categories) == 1000, len(categories)
    index = {name: i for i, name in enumerate(categories)}
    assert len(index) == 1000, "ImageNet names are not unique"
    lower: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    for n in categories:
        key = normalise(n)
        if key in lower:
            ambiguous.setdefault(key, [lower[key]]).append(n)
        lower[key] = n
    assert set(ambiguous) == {"cardigan"}, ambiguous
    for key in ambiguous:
        del lower[key]

    def idx(name: str) -> int:
        if name not in index:
            raise SystemExit(f"not an ImageNet-1k class name: {name!r}")
        return index[name]

    groups = {}
    for tag, items in GROUPS.items():
        assert tag == normalise(tag), tag
        names: list[str] = []
        for item in items:
            if isinstance(item, tuple):
                first, last, size = item
                a, b = idx(first), idx(last)
                span = categories[a:b + 1]
                assert len(span) == size, f"{tag}: {first}..{last} has {len(span)} classes, expected {size}"
                names.extend(span)
            else:
                idx(item)
                names.append(item)
        assert len(set(names)) == len(names), f"{tag}: duplicate classes"
        if tag in EXPECTED_SIZES:
            assert len(names) == EXPECTED_SIZES[tag], f"{tag}: {len(names)} classes, expected {EXPECTED_SIZES[tag]}"
        groups[tag] = {"names": names, "indices": [index[n] for n in names]}

    synonyms = {}
    for alias, target in SYNONYMS.items():
        assert alias == normalise(alias), alias
        assert alias not in groups, f"synonym {alias!r} is also a group"
        if target in groups:
            synonyms[alias] = {"group": target}
        elif target in lower:
            synonyms[alias] = {"imagenet": lower[target]}
        else:
            raise SystemExit(f"synonym {alias!r} -> {target!r}: neither a group nor an ImageNet name")

    for tag in list(groups) + list(synonyms):
        target = synonyms.get(tag, {"group": tag})
        members = groups[target["group"]]["names"] if "group" in target else [target["imagenet"]]
        if tag in lower and lower[tag] not in members and tag not in OVERRIDES:
            raise SystemExit(f"tag {tag!r} hides the ImageNet class {lower[tag]!r}: add it to OVERRIDES or rename")
    for tag in OVERRIDES:
        assert tag in groups or tag in synonyms or tag in UNSUPPORTED, f"override {tag!r} is not a tag"
    for tag, reason in UNSUPPORTED.items():
        assert tag == normalise(tag) and tag not in groups and tag not in synonyms, tag
        assert tag not in lower or tag in OVERRIDES, f"refused tag {tag!r} hides an ImageNet class: add it to OVERRIDES"
        if reason.startswith("see "):
            assert reason[5:-1] in UNSUPPORTED and not UNSUPPORTED[reason[5:-1]].startswith("see "), tag
    for tag in NEAREST:
        assert tag in groups and tag not in lower, tag
    for tag in list(groups) + list(synonyms) + list(UNSUPPORTED):
        assert tag not in ambiguous, tag

    # Reverse map: the first group (in GROUPS order, VOC/COCO first) that holds each class.
    class_tags: dict[str, str] = {}
    for tag, g in groups.items():
        for i in g["indices"]:
            class_tags.setdefault(str(i), tag)

    return {
        "version": 1,
        "about": "Everyday tags -> ImageNet-1k class sets. Generated by scripts/make_tag_map.py; do not edit.",
        "notes": NOTES,
        "imagenet_categories": list(categories),
        "groups": groups,
        "synonyms": synonyms,
        "unsupported": dict(UNSUPPORTED),
        "nearest": {tag: entry["why"] for tag, entry in NEAREST.items()},
        "overrides": dict(OVERRIDES),
        "ambiguous_names": ambiguous,
        "class_tags": class_tags,
    }


def render(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSON (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="only compare with the existing file; exit 1 if it differs")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from explainers.backbones import imagenet_categories

    text = render(build(imagenet_categories()))
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from the tables'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    doc = json.loads(text)
    print(f"wrote {args.out}: {len(doc['groups'])} groups, {len(doc['synonyms'])} synonyms, "
          f"{len(doc['unsupported'])} unsupported tags")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
