"""The ImageNet-style folder: its classes, their names and its image files; the files' odd modes
converted and broken ones skipped by the decoder that the prepare stage passes every file through."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsclip_lib.data.captions import IMAGENET_CLASSNAMES
from gsclip_lib.data.image_decoding import image_to_tensor, resize_and_center_crop, to_rgb_or_gray
from gsclip_lib.data.image_folder import find_class_dirs, find_images, read_class_names
from gsclip_lib.data.image_text_shards import decode_image
from gsclip_lib.data.skip_counts import SkipSample
from gsclip_lib.errors import InputError

SIZE = 6  # every test image is 6x6 or has a shorter side of 6, so no resampling blurs the pixel checks


def _rgba_image() -> Image.Image:
    pixels = np.zeros((SIZE, SIZE, 4), np.uint8)
    pixels[:, :3] = (255, 0, 0, 255)  # opaque red on the left
    pixels[:, 3:] = (0, 0, 0, 0)  # fully transparent black on the right
    pixels[0, 5] = (0, 0, 0, 128)  # half-transparent black
    return Image.fromarray(pixels, "RGBA")


def _palette_image() -> Image.Image:
    image = Image.new("P", (SIZE, SIZE), 0)
    image.putpalette([0, 0, 255, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    image.paste(1, (0, 0, SIZE, 2))  # top two rows green, the rest blue
    image.paste(2, (0, SIZE - 1, SIZE, SIZE))  # bottom row index 2, marked transparent below
    image.info["transparency"] = 2
    return image


@pytest.fixture
def tree(tmp_path):
    """Three classes: 'apple' (PNG modes), 'ball' (JPEGs, one truncated), 'cup' (a 12x6 crop, garbage)."""
    root = tmp_path / "val"
    for name in ("apple", "ball", "cup", ".hidden"):
        (root / name).mkdir(parents=True)
    _rgba_image().save(root / "apple" / "a_rgba.png")
    _palette_image().save(root / "apple" / "b_palette.png", transparency=2)
    wide = np.full((SIZE, SIZE), 32896, np.uint16)  # 128 * 257: mid-grey in 16 bits
    wide[0, 0] = 65535
    Image.fromarray(wide).save(root / "apple" / "c_16bit.PNG")
    (root / "apple" / "notes.txt").write_text("not an image, not counted")
    Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)).save(root / "ball" / "a_cmyk.JPEG", quality=95)
    Image.new("L", (SIZE, SIZE), 200).save(root / "ball" / "b_gray.jpg", quality=95)
    # A JPEG cut short: its header opens, its pixels fail to decode.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "ball" / "c_truncated.jpeg", quality=95)
    (root / "ball" / "c_truncated.jpeg").write_bytes((root / "ball" / "c_truncated.jpeg").read_bytes()[:2000])
    (root / "cup" / "garbage.PNG").write_bytes(b"not an image at all")  # not even a header
    (root / "ball" / "sub").mkdir()
    Image.new("RGB", (SIZE, SIZE), (0, 0, 0)).save(root / "ball" / "sub" / "d_nested.png")
    stripes = np.zeros((SIZE, 12, 3), np.uint8)
    stripes[:, 4:8] = 255  # white middle third of a 12x6 image
    Image.fromarray(stripes).save(root / "cup" / "wide.png")
    Image.new("RGB", (SIZE, SIZE), 0).save(root / ".hidden" / "ignored.png")
    return root


def _files(root: Path) -> list[tuple[Path, int]]:
    """Every image file of the folder with its label, as the prepare stage lists them."""
    return [(path, label) for label, name in enumerate(find_class_dirs(root)) for path in find_images(root / name)]


def _decode_all(root: Path, image_size: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict[str, SkipSample]]:
    """The folder's images decoded as prepare checks them and the shards read them, broken ones skipped."""
    images, labels, skipped = [], [], {}
    for path, label in _files(root):
        try:
            images.append(decode_image(path.read_bytes(), channels, image_size, "center_crop"))
        except SkipSample as skip:
            skipped[path.name] = skip
            continue
        labels.append(label)
    return torch.stack(images), torch.tensor(labels), skipped


def test_folder_lists_classes_and_images(tree):
    assert find_class_dirs(tree) == ["apple", "ball", "cup"]  # .hidden is no class
    assert read_class_names(find_class_dirs(tree), None) == ("apple", "ball", "cup")
    assert [p.name for p in find_images(tree / "apple")] == ["a_rgba.png", "b_palette.png", "c_16bit.PNG"]
    assert [p.relative_to(tree / "ball").as_posix() for p in find_images(tree / "ball")] == [
        "a_cmyk.JPEG", "b_gray.jpg", "c_truncated.jpeg", "sub/d_nested.png",
    ]
    # three PNGs, three JPEGs, one nested PNG, the wide PNG, the garbage; notes.txt is not counted
    assert len(_files(tree)) == 9


def test_folder_images_convert_and_broken_ones_are_skipped(tree):
    images, labels, skipped = _decode_all(tree, SIZE)
    assert list(skipped) == ["c_truncated.jpeg", "garbage.PNG"]
    truncated, garbage = skipped.values()
    assert truncated.reason == "truncated_image" and "image file is truncated" in str(truncated)
    assert garbage.reason == "undecodable_image" and "cannot identify image file" in str(garbage)
    assert images.shape == (7, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2]
    pixels = (images * 255).round().to(torch.int64).permute(0, 2, 3, 1)  # [B, S, S, 3]
    rgba, palette, wide, cmyk, gray, nested, cup = pixels
    assert rgba[2, 0].tolist() == [255, 0, 0]
    assert rgba[2, 4].tolist() == [255, 255, 255]  # transparent composites to white
    assert rgba[0, 5].tolist() == [127, 127, 127]  # half-transparent black: halfway to white
    assert palette[0, 0].tolist() == [0, 255, 0] and palette[3, 3].tolist() == [0, 0, 255]
    assert palette[SIZE - 1, 0].tolist() == [255, 255, 255]  # the transparent palette index
    assert wide[1, 1].tolist() == [128] * 3 and wide[0, 0].tolist() == [255] * 3  # 16 bits scaled to 8
    assert (cmyk - torch.tensor([255, 0, 0])).abs().max() <= 3  # JPEG is lossy
    assert (gray - 200).abs().max() <= 1 and nested.max() == 0
    # 12x6 centre-cropped to 6x6 keeps columns 3..8: black, four white, black.
    assert cup[:, :, 0].tolist() == [[0, 255, 255, 255, 255, 0]] * SIZE


def test_grayscale_channels_and_resize(tree):
    images, _, skipped = _decode_all(tree, 4, channels=1)
    assert images.shape == (7, 1, 4, 4) and len(skipped) == 2
    red = Image.new("RGB", (3, 3), (255, 0, 0))
    assert to_rgb_or_gray(red, 1).getpixel((1, 1)) == 76  # ITU-R 601 luma of pure red
    assert to_rgb_or_gray(Image.new("L", (2, 2), 9), 3).getpixel((0, 0)) == (9, 9, 9)
    assert to_rgb_or_gray(Image.new("LA", (2, 2), (0, 0)), 1).getpixel((0, 0)) == 255
    tall = resize_and_center_crop(Image.new("RGB", (10, 30)), 5)
    assert tall.size == (5, 5)
    assert image_to_tensor(Image.new("L", (3, 2), 255)).shape == (1, 2, 3)
    with pytest.raises(ValueError, match="channels must be 1"):
        to_rgb_or_gray(red, 4)
    with pytest.raises(ValueError, match="image size must be a positive integer"):
        resize_and_center_crop(red, 0)


def test_class_names_from_file_or_imagenet(tree, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("red apple\nbouncy ball\ncoffee cup\n\n")
    assert read_class_names(find_class_dirs(tree), names) == ("red apple", "bouncy ball", "coffee cup")
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert read_class_names(wnids, None) == IMAGENET_CLASSNAMES
    assert read_class_names(["golden_retriever"], None) == ("golden retriever",)
    with pytest.raises(ValueError, match=r"999 of the 999 class folders are named like WordNet ids .* names file"):
        read_class_names(wnids[:999], None)


def test_bad_folders_are_named(tree, tmp_path):
    with pytest.raises(InputError, match="image folder not found: .*absent"):
        find_class_dirs(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "loose.png").write_bytes(b"")
    with pytest.raises(InputError, match="has no class folders; expected the layout"):
        find_class_dirs(empty)
    (empty / "cls").mkdir()
    assert find_class_dirs(empty) == ["cls"] and find_images(empty / "cls") == []
    class_dirs = find_class_dirs(tree)
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="names.txt has 2 class names but there are 3 class folders"):
        read_class_names(class_dirs, names)
    names.write_text("one\n\nthree\n")
    with pytest.raises(ValueError, match="blank line at line 2"):
        read_class_names(class_dirs, names)
    with pytest.raises(InputError, match="class names file not found"):
        read_class_names(class_dirs, tmp_path / "nope.txt")


@pytest.mark.parametrize("size", [224, 37])
def test_resize_and_crop_match_clip_preprocessing(size):
    """The same pixels as torchvision's Resize(bicubic) + CenterCrop, open_clip's evaluation transform."""
    import skimage.data
    from torchvision import transforms

    photo = Image.fromarray(skimage.data.chelsea())  # 451x300, real photograph
    reference = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
    ])(photo)
    torch.testing.assert_close(image_to_tensor(resize_and_center_crop(photo, size)), reference, rtol=0, atol=0)
