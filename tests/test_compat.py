"""The original module's helper names keep their meaning (no processes)."""

from __future__ import annotations

from torch import nn

from credit_dtensor import (
    _needs_halo_conv2d,
    _needs_halo_conv3d,
    _needs_halo_conv_transpose2d,
    _needs_halo_conv_transpose3d,
    _replace_module,
)


def test_needs_halo_matches_the_original_rules():
    assert _needs_halo_conv2d(nn.Conv2d(2, 2, 3, padding=1))
    assert not _needs_halo_conv2d(nn.Conv2d(2, 2, 1))
    assert not _needs_halo_conv2d(nn.Conv2d(2, 2, (1, 3), padding=(0, 1)))
    assert _needs_halo_conv2d(nn.Conv2d(2, 2, (3, 1)))
    assert _needs_halo_conv3d(nn.Conv3d(2, 2, (1, 3, 1)))
    assert not _needs_halo_conv3d(nn.Conv3d(2, 2, (3, 1, 3)))
    assert _needs_halo_conv_transpose2d(nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1))
    assert not _needs_halo_conv_transpose2d(nn.ConvTranspose2d(2, 2, 2, stride=2))
    assert not _needs_halo_conv_transpose3d(nn.ConvTranspose3d(2, 2, (2, 4, 4), stride=(2, 4, 4)))
    assert _needs_halo_conv_transpose3d(nn.ConvTranspose3d(2, 2, (1, 3, 1), stride=(1, 2, 1)))


def test_replace_module_both_signatures():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1)), nn.ReLU())
    new = nn.Identity()
    _replace_module(model[0], "0", model[0][0], new)  # original: (parent, name, old, new)
    assert model[0][0] is new
    newer = nn.Tanh()
    _replace_module(model, "0.0", newer)  # dotted path, new only
    assert model[0][0] is newer
