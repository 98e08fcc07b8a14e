"""Image and latent folders read per batch (racedit.data.LazyDataset): the same values as
the in-memory loaders bit for bit, each rank checking only its share of the files, a rank
holding no samples, and under mpirun a 2-rank run on a latent folder equal to one rank with
twice the accumulation, and a bad file in rank 1's share ending the job with its name."""
import builtins
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from racedit import data
from racedit.data import DataError, ImageFolderDataset, LatentFolderDataset

from test_distributed import _check, _cli, _log, _same, _tensors, needs_mpi


def _latent_folder(root, n=12, size=8, channels=4):
    """n samples in files of 1 (C,H,W) or blocks of 2 and 3 samples in several dtypes, one
    block in Fortran order: 0.npy (C,H,W) f4, 1.npy (2,...) f8, 2.npy (3,...) >f4, 3.npy
    (2,...) f2, 4.npy (2,...) Fortran f4, then single samples."""
    os.makedirs(root / "features")
    os.makedirs(root / "labels")
    rng = np.random.default_rng(3)
    specs = [(None, "<f4"), (2, "<f8"), (3, ">f4"), (2, "<f2"), (2, "F")]
    specs += [(None, "<f4")] * (n - sum(k or 1 for k, _ in specs))
    for i, (k, dt) in enumerate(specs):
        shape = (channels, size, size) if k is None else (k, channels, size, size)
        x = rng.standard_normal(shape)
        x = np.asfortranarray(x.astype(np.float32)) if dt == "F" else x.astype(dt)
        np.save(root / "features" / f"{i:02d}.npy", x)
        np.save(root / "labels" / f"{i:02d}.npy",
                np.int64(i % 3) if k is None else (np.arange(k) + i) % 3)
    return sorted(os.listdir(root / "features"))


def _image_folder(root, n=7):
    rng = np.random.default_rng(4)
    for i in range(n):
        os.makedirs(root / f"c{i % 2}", exist_ok=True)
        w, h = (20 + 3 * i, 14 + 5 * i)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"c{i % 2}" / f"{i}.png")


IDX = np.array([11, 0, 3, 3, 1, 9, 5, 2, 7, 4, 6, 8, 10, -1])


def test_lazy_latents_equal_the_in_memory_loader(tmp_path):
    _latent_folder(tmp_path)
    mem = data.load_latents(str(tmp_path))
    lazy = data.load_latents(str(tmp_path), lazy=True)
    assert isinstance(lazy, LatentFolderDataset) and not isinstance(mem, LatentFolderDataset)
    assert (len(lazy), lazy.channels, lazy.image_size, lazy.num_classes, lazy.kind,
            lazy.source, lazy.class_names) == (len(mem), mem.channels, mem.image_size,
                                               mem.num_classes, mem.kind, mem.source,
                                               mem.class_names)
    np.testing.assert_array_equal(lazy.y, mem.y)
    for idx in (IDX, np.arange(12), slice(2, 9), np.arange(12) % 2 == 0):
        xl, yl = lazy.batch(idx)
        xm, ym = mem.batch(idx)
        assert xl.dtype == xm.dtype == np.float32 and yl.dtype == ym.dtype == np.int64
        assert xl.tobytes() == xm.tobytes() and np.array_equal(yl, ym)
    with pytest.raises(IndexError, match="12 is out of bounds for 12"):
        lazy.batch([0, 12])


def test_lazy_image_folder_equals_the_in_memory_loader(tmp_path):
    _image_folder(tmp_path)
    for channels in (3, 1):
        mem = data.load_folder(str(tmp_path), 8, channels)
        lazy = data.load_folder(str(tmp_path), 8, channels, lazy=True)
        assert isinstance(lazy, ImageFolderDataset)
        assert (len(lazy), lazy.channels, lazy.image_size, lazy.class_names) == \
            (7, channels, 8, ["c0", "c1"])
        idx = np.array([6, 0, 2, 2, 5, 1, 3, 4])
        xl, yl = lazy.batch(idx)
        xm, ym = mem.batch(idx)
        assert xl.tobytes() == xm.tobytes() and np.array_equal(yl, ym)


def test_choice_of_reading(tmp_path, monkeypatch):
    """One rank: in memory up to LAZY_BYTES, per batch above; several ranks: per batch."""
    _latent_folder(tmp_path / "lat")
    _image_folder(tmp_path / "img")
    assert type(data.load_latents(str(tmp_path / "lat"))) is data.ArrayDataset
    assert type(data.load_folder(str(tmp_path / "img"), 8)) is data.ArrayDataset
    assert isinstance(data.load_latents(str(tmp_path / "lat"), shard=(1, 2)), LatentFolderDataset)
    ds = data.load_data("folder", str(tmp_path / "img"), image_size=8, shard=(0, 2))
    assert isinstance(ds, ImageFolderDataset)
    assert type(data.load_data("builtin", n=20, shard=(1, 2))) is data.ArrayDataset
    monkeypatch.setattr(data, "LAZY_BYTES", 7 * 3 * 8 * 8 - 1)
    assert isinstance(data.load_latents(str(tmp_path / "lat")), LatentFolderDataset)
    assert isinstance(data.load_folder(str(tmp_path / "img"), 8), ImageFolderDataset)
    with pytest.raises(ValueError, match=r"shard: expected 0 <= rank < world size, got \(2, 2\)"):
        data.load_latents(str(tmp_path / "lat"), shard=(2, 2))


def _count_opens(monkeypatch):
    """The paths racedit.data opens, as "<folder>/<file>"."""
    opened = []

    def counting(fp, *args, **kwargs):
        opened.append(os.path.join(*str(fp).split(os.sep)[-2:]))
        return builtins.open(fp, *args, **kwargs)

    monkeypatch.setattr(data, "open", counting, raising=False)
    return opened


def test_each_rank_reads_its_share_and_holds_no_samples(tmp_path, monkeypatch):
    """Rank r of 3 reads every label file, the header of the first features file and the
    features (and labels again) of files r, r+3, ... only; the object holds labels and
    file offsets, no sample; batch() opens only the files of the requested samples."""
    names = _latent_folder(tmp_path, n=14)
    opened = _count_opens(monkeypatch)
    for r in range(3):
        opened.clear()
        ds = data.load_latents(str(tmp_path), shard=(r, 3))
        share = names[r::3]
        assert list(ds.checked) == list(range(r, len(names), 3))
        assert sorted(opened) == sorted([f"labels/{n}" for n in names + share]
                                        + [f"features/{n}" for n in [names[0]] + share])
        held = [v for v in vars(ds).values() if isinstance(v, np.ndarray)]
        assert sum(a.nbytes for a in held) == ds.y.nbytes + ds.starts.nbytes
        assert ds.y.nbytes + ds.starts.nbytes < 4 * 4 * 8 * 8  # less than one sample
    opened.clear()
    ds.batch([4, 5])  # samples 4 and 5: the last rows of 02.npy
    assert opened == [f"features/{names[2]}"]


def test_each_rank_checks_only_its_share(tmp_path):
    names = _latent_folder(tmp_path)
    bad = np.zeros((4, 8, 8), np.float32)
    bad[1, 2, 3] = np.nan
    np.save(tmp_path / "features" / names[1], bad[None].repeat(2, 0))
    for r in (0, 2):
        data.load_latents(str(tmp_path), shard=(r, 3))  # 01.npy is rank 1's
    with pytest.raises(DataError, match=r"01\.npy: non-finite value nan"):
        data.load_latents(str(tmp_path), shard=(1, 3))
    with pytest.raises(DataError, match=r"01\.npy: non-finite value nan"):
        data.load_latents(str(tmp_path), lazy=True)  # one rank checks every file


def test_every_rank_checks_labels_and_the_first_header(tmp_path):
    names = _latent_folder(tmp_path)
    np.save(tmp_path / "labels" / names[4], np.array([0, 5000]))
    with pytest.raises(DataError, match=r"04\.npy: labels must lie in \[0, 1000\)"):
        data.load_latents(str(tmp_path), num_classes=1000, shard=(0, 2))
    np.save(tmp_path / "labels" / names[4], np.array([0, 1]))
    np.save(tmp_path / "features" / names[0], np.zeros((4, 8, 6), np.float32))
    with pytest.raises(DataError, match=r"00\.npy: expected square latents"):
        data.load_latents(str(tmp_path), shard=(1, 2))
    np.save(tmp_path / "features" / names[0], np.zeros((4, 6, 6), np.float32))
    with pytest.raises(DataError, match=r"mixed sizes"):  # the owner of a file of 8x8
        data.load_latents(str(tmp_path), shard=(1, 2))
    os.remove(tmp_path / "labels" / names[3])
    with pytest.raises(DataError, match=r"03\.npy: no matching label file"):
        data.load_latents(str(tmp_path), shard=(1, 2))


def test_a_file_changed_after_the_check_is_an_error(tmp_path):
    names = _latent_folder(tmp_path)
    ds = data.load_latents(str(tmp_path), lazy=True)
    np.save(tmp_path / "features" / names[2], np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"02\.npy: features of shape \(1, 4, 8, 8\) float32 "
                                        r"changed since they were checked \(expected 3 x"):
        ds.batch([3])
    np.save(tmp_path / "features" / names[2], np.zeros((3, 4, 8, 8), np.int32))
    with pytest.raises(DataError, match=r"02\.npy: .* int32 changed"):
        ds.batch([3])
    ds.batch([0, 1, 2, 6])  # the other files as they were


def test_image_folder_share(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "c1" / "3.png").write_bytes(b"not an image")  # file index 5 (c0: 0,2,4,6)
    data.load_folder(str(tmp_path), 8, shard=(0, 2))
    with pytest.raises(DataError, match=r"3\.png: cannot read image"):
        data.load_folder(str(tmp_path), 8, shard=(1, 2))
    ds = data.load_folder(str(tmp_path), 8, shard=(0, 2))
    assert list(ds.checked) == [0, 2, 4, 6]
    assert [v for v in vars(ds).values() if isinstance(v, np.ndarray)] == [ds.y]


# ---- two ranks -----------------------------------------------------------------------

@needs_mpi
def test_two_ranks_on_a_latent_folder_equal_one_rank(tmp_path):
    _latent_folder(tmp_path / "lat", n=40)
    flags = ("--steps", "6", "--global-batch-size", "8", "--data", "latents",
             str(tmp_path / "lat"))
    two = _check(_cli(tmp_path, "two", *flags, ranks=2))
    one = _check(_cli(tmp_path, "one", *flags, "--grad-accum", "2"))
    assert "data LatentFolderDataset(40 x (4, 8, 8)" in two.stdout  # read per batch
    assert "data ArrayDataset(40 x (4, 8, 8)" in one.stdout         # in memory
    _same(_tensors(tmp_path / "two"), _tensors(tmp_path / "one"))
    keys = ("loss", "grad_norm", "tau")
    assert ([[r.get(k) for k in keys] for r in _log(tmp_path / "two")]
            == [[r.get(k) for k in keys] for r in _log(tmp_path / "one")])


@needs_mpi
def test_a_bad_file_in_rank_1s_share_ends_the_job(tmp_path):
    names = _latent_folder(tmp_path / "lat", n=40)
    x = np.load(tmp_path / "lat" / "features" / names[7])
    x[0, 0, 0] = np.inf
    np.save(tmp_path / "lat" / "features" / names[7], x)
    try:
        r = _cli(tmp_path, "run", "--steps", "6", "--data", "latents", str(tmp_path / "lat"),
                 ranks=2, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after rank 1 found a bad file")
    assert r.returncode != 0
    assert f"rank 1/2: DataError: {tmp_path / 'lat' / 'features' / names[7]}: non-finite" \
        in r.stderr, r.stderr[-3000:]
    assert "rank 0/2" not in r.stderr
