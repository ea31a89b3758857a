"""Training transforms: horizontal flips are off unless asked for (captions name left/right), and a flip mirrors."""
import numpy as np
import pytest
import torch

from videoprism.data.transforms import Augment, apply_augment


def _draws(n, **kw):
    return [Augment.draw(np.random.default_rng([7, i]), **kw) for i in range(n)]


def test_default_training_draw_never_flips():
    # "moves left" becomes wrong under a mirror: the default must not flip any sample.
    assert not any(a.flip for a in _draws(200))


def test_flip_prob_flips_its_share_and_leaves_the_crop_alone():
    never, half, always = _draws(400, flip_prob=0.0), _draws(400, flip_prob=0.5), _draws(400, flip_prob=1.0)
    assert all(a.flip for a in always)
    assert 0.4 < np.mean([a.flip for a in half]) < 0.6
    # The crop of sample i is the same whatever the flip probability (one random stream, same draws).
    strip = lambda a: (a.area, a.log_ratio, a.u, a.v)  # noqa: E731
    assert [strip(a) for a in never] == [strip(a) for a in half] == [strip(a) for a in always]


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_flip_prob_out_of_range_is_refused(p):
    with pytest.raises(ValueError, match="flip_prob"):
        Augment.draw(np.random.default_rng(0), flip_prob=p)


def test_flip_mirrors_the_frames():
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8))
    aug = Augment(train=True, area=1.0, flip=False)
    plain = apply_augment(frames, aug, 20)
    mirrored = apply_augment(frames, Augment(train=True, area=1.0, flip=True), 20)
    assert torch.equal(plain, frames)  # full-frame box at the same size: no resampling
    assert torch.equal(mirrored, torch.from_numpy(frames.numpy()[:, :, ::-1].copy()))
