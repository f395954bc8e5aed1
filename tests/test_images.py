"""aff_zoo.data.images: every PIL mode a user's file can have becomes the right 8-bit RGB pixels
(tiny generated images, expected values written by hand), and unreadable files give an ImageError."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from aff_zoo.data import images as zim
from aff_zoo.data.images import ImageError, load_rgb, to_rgb


def _png(im: Image.Image, fmt='PNG', **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _px(im) -> list:
    assert im.mode == 'RGB'
    return np.asarray(im).reshape(-1, 3).tolist()


def test_16bit_png_is_scaled_not_clipped():
    a = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    src = Image.fromarray(a)
    assert src.mode == 'I;16'
    data = _png(src)
    assert Image.open(io.BytesIO(data)).mode == 'I;16'  # the file really is 16-bit
    # round(v / 257): 1000/257 = 3.89 -> 4; 32896 = 128 * 257. PIL's convert('RGB') gives 0, 255, 255, 255, 255.
    assert _px(load_rgb(data)) == [[0] * 3, [1] * 3, [4] * 3, [128] * 3, [255] * 3]


def test_16bit_big_endian():
    src = Image.fromarray(np.array([[257, 65535, 32896]], dtype='>u2'))
    assert src.mode == 'I;16B'
    assert _px(to_rgb(src)) == [[1] * 3, [255] * 3, [128] * 3]


def test_32bit_int_as_16bit_samples_and_other_ranges_stretched():
    src = Image.fromarray(np.array([[0, 514, 65535]], dtype=np.int32))
    assert src.mode == 'I'
    assert _px(to_rgb(src)) == [[0] * 3, [2] * 3, [255] * 3]
    # outside 0..65535: min..max -> 0..255; (0 - -100) / 200 * 255 = 127.5 -> 128
    wide = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    assert _px(to_rgb(wide)) == [[0] * 3, [128] * 3, [255] * 3]


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.1]], dtype=np.float32))
    assert unit.mode == 'F'
    assert _px(to_rgb(unit)) == [[0] * 3, [128] * 3, [255] * 3, [26] * 3]  # 25.5 -> 26
    other = Image.fromarray(np.array([[10.0, 20.0, 30.0]], dtype=np.float32))
    assert _px(to_rgb(other)) == [[0] * 3, [128] * 3, [255] * 3]
    with pytest.raises(ImageError, match='NaN'):
        to_rgb(Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)))


def test_rgba_composited_on_white():
    a = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128], [0, 0, 0, 51]]], dtype=np.uint8)
    data = _png(Image.fromarray(a, 'RGBA'))
    # (c * a + 255 * (255 - a)) / 255, rounded: a=128 -> (200*128 + 255*127)/255 = 227.4 -> 227,
    # (100*128 + 32385)/255 = 177.2 -> 177, 32385/255 = 127; a=51 -> 255*204/255 = 204
    assert _px(load_rgb(data)) == [[200, 100, 0], [255, 255, 255], [227, 177, 127], [204, 204, 204]]
    assert zim.BACKGROUND == (255, 255, 255)


def test_la_and_palette_with_transparency():
    la = Image.fromarray(np.array([[[10, 255], [10, 0], [0, 128]]], dtype=np.uint8), 'LA')
    assert _px(load_rgb(_png(la))) == [[10] * 3, [255] * 3, [127] * 3]
    p = Image.new('P', (3, 1))
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2])
    assert _px(load_rgb(_png(p))) == [[255, 0, 0], [0, 0, 255], [0, 255, 0]]  # palette colours
    data = _png(p, transparency=1)  # tRNS: index 1 fully transparent
    assert Image.open(io.BytesIO(data)).info.get('transparency') is not None
    assert _px(load_rgb(data)) == [[255, 0, 0], [255, 255, 255], [0, 255, 0]]
    pa = p.convert('PA')
    assert pa.mode == 'PA' and _px(to_rgb(pa)) == [[255, 0, 0], [0, 0, 255], [0, 255, 0]]


def test_grey_binary_and_cmyk():
    assert _px(load_rgb(_png(Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))))) == \
        [[0] * 3, [77] * 3, [255] * 3]
    one = Image.new('1', (2, 1))
    one.putpixel((1, 0), 1)
    assert _px(to_rgb(one)) == [[0] * 3, [255] * 3]
    cmyk = Image.new('CMYK', (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 255, 0)])  # white; cyan + yellow = green
    data = _png(cmyk, 'TIFF')
    assert Image.open(io.BytesIO(data)).mode == 'CMYK'
    assert _px(load_rgb(data)) == [[255, 255, 255], [0, 255, 0]]


def test_exif_orientation_applied():
    a = np.zeros((1, 2, 3), dtype=np.uint8)
    a[0, 0] = (255, 0, 0)  # stored: red | black, 2 wide x 1 high
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held upright: rotate 90 degrees clockwise to display
    data = _png(Image.fromarray(a), exif=exif.tobytes())  # PNG eXIf chunk: exact pixels (JPEG is lossy)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6
    out = load_rgb(data)
    assert out.size == (1, 2) and _px(out) == [[255, 0, 0], [0, 0, 0]]  # red on top


def test_animated_first_frame_warns_once(monkeypatch):
    monkeypatch.setattr(zim, '_warned_animated', False)
    frames = [Image.new('RGB', (2, 2), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, 'GIF', save_all=True, append_images=frames[1:], duration=100, loop=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        first = load_rgb(buf.getvalue())
        load_rgb(buf.getvalue())
    assert _px(first) == [[255, 0, 0]] * 4
    assert len([x for x in w if 'first frame' in str(x.message)]) == 1


def test_decompression_bomb_is_a_clear_error(monkeypatch, tmp_path):
    p = tmp_path / 'big.png'
    Image.new('RGB', (40, 40)).save(p)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # 1600 px > 2 x 100: PIL refuses
    with pytest.raises(ImageError, match='decompression bomb.*MAX_IMAGE_PIXELS'):
        load_rgb(p)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ImageError, match='no such image file'):
        load_rgb(tmp_path / 'missing.png')
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'not an image')
    with pytest.raises(ImageError, match='cannot read .*bad.jpg'):
        load_rgb(bad)
    good = _png(Image.new('RGB', (64, 64), (1, 2, 3)), 'JPEG')
    cut = tmp_path / 'cut.jpg'
    cut.write_bytes(good[:len(good) // 2])
    with pytest.raises(ImageError, match='truncated'):
        load_rgb(cut)


def test_to_rgb_as_a_timm_dataset_conversion(tmp_path):
    """timm's ImageDataset with input_img_mode=None hands the lazily opened file to to_rgb (the streaming loader)."""
    from timm.data import ImageDataset
    (tmp_path / 'a').mkdir()
    Image.fromarray(np.array([[0, 32896], [65535, 257]], dtype=np.uint16)).save(tmp_path / 'a' / 'x.png')
    ds = ImageDataset(str(tmp_path), input_img_mode=None, transform=to_rgb)
    img, target = ds[0]
    assert target == 0 and _px(img) == [[0] * 3, [128] * 3, [255] * 3, [1] * 3]


def test_data_sets_use_the_reader(tmp_path):
    """The in-memory data path decodes a 16-bit PNG and an RGBA PNG like load_rgb, not by clipping."""
    from aff_zoo.data import load_images
    for c, im in (('a', Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16))),
                  ('b', Image.fromarray(np.full((2, 2, 4), (0, 0, 0, 0), dtype=np.uint8), 'RGBA'))):
        (tmp_path / 'd' / c).mkdir(parents=True)
        im.save(tmp_path / 'd' / c / 'x.png')
    arrays = load_images(str(tmp_path / 'd'), cache=str(tmp_path / 'cache'), progress=False)
    assert arrays.classes == ['a', 'b']
    assert arrays.images[0].reshape(-1, 3).tolist() == [[128] * 3] * 4
    assert arrays.images[1].reshape(-1, 3).tolist() == [[255] * 3] * 4
