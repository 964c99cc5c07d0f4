"""The embedded model's converted folder (`stepcredit prepare-model`)."""

from __future__ import annotations

import stat


def test_the_converted_default_model_is_readable_by_other_users(smol_path):
    # mkdtemp's 0700 used to survive the rename: a container's non-root user could
    # not read a model prepared at build time by root.
    mode = smol_path.stat().st_mode
    assert mode & (stat.S_IROTH | stat.S_IXOTH) == stat.S_IROTH | stat.S_IXOTH, oct(mode)
