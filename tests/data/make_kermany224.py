"""Writes tests/data/kermany224/{NORMAL,PNEUMONIA}/ from the Kermany validation originals in
samples/: each image squashed to the model's 224x224 and stored as RGB JPEG quality 75, the
way the project's training copies were made (see README.md here). Run from the repository
root: `python tests/data/make_kermany224.py`."""

from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SIZE = 224


def label(path: Path) -> str:
    """Kermany names: `NORMAL2-IM-*` images are NORMAL, `person*_bacteria_*` PNEUMONIA."""
    return "PNEUMONIA" if path.name.startswith("person") else "NORMAL"


def main() -> None:
    out = REPO / "tests" / "data" / "kermany224"
    for source in sorted((REPO / "samples").glob("study-*/*.jpeg")):
        target = out / label(source) / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as img:
            img.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(target, quality=75)


if __name__ == "__main__":
    main()
