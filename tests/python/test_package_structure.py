"""The package's names and module graph: one public class per name, old names as deprecated
aliases, and no import cycle between turboquant's own modules."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import turboquant as tq
from turboquant.kv_cache import CompressedKVCache


def test_old_builder_cache_name_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match=r"use turboquant\.CompressedKVCache"):
        old = tq.TurboQuantKVCache
    assert old is CompressedKVCache
    assert isinstance(tq.KVCacheBuilder().with_head_dim(64).build(), old)


def test_old_name_by_from_import_warns_too():
    with pytest.warns(DeprecationWarning, match="CompressedKVCache"):
        from turboquant import TurboQuantKVCache  # noqa: F401


def test_new_name_and_other_attributes_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tq.CompressedKVCache is CompressedKVCache
        assert "CompressedKVCache" in tq.__all__ and "TurboQuantKVCache" not in tq.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        tq.no_such_name  # noqa: B018


def test_importing_the_package_does_not_warn():
    code = "import warnings; warnings.simplefilter('error'); import turboquant, turboquant.builder"
    subprocess.run([sys.executable, "-c", code], check=True)
