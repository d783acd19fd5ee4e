"""The command-line tools' persistent compilation cache (nanodet_jax.compile_cache)."""

from __future__ import annotations

import jax
import pytest

from nanodet_jax.compile_cache import ENV, default_cache_dir, enable_compile_cache


@pytest.fixture
def restore_jax_cache_config():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", None)  # the suite's own cache is set
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_disabled_by_the_environment(monkeypatch, restore_jax_cache_config, value):
    monkeypatch.setenv(ENV, value)
    before = jax.config.jax_compilation_cache_dir
    assert enable_compile_cache() is None
    assert jax.config.jax_compilation_cache_dir == before


def test_environment_path_is_created_and_used(monkeypatch, tmp_path, restore_jax_cache_config):
    monkeypatch.setenv(ENV, str(tmp_path / "c"))
    assert enable_compile_cache() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")


def test_existing_jax_setting_is_kept_else_the_user_cache(monkeypatch, tmp_path,
                                                        restore_jax_cache_config):
    monkeypatch.setenv(ENV, str(tmp_path / "ours"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    assert enable_compile_cache() == tmp_path / "mine"  # left alone, settings included
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "nanodet_jax" / "xla"
    assert enable_compile_cache() == default_cache_dir() and default_cache_dir().is_dir()


def test_unwritable_location_only_disables_it(monkeypatch, tmp_path, restore_jax_cache_config):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(ENV, str(blocker / "sub"))
    assert enable_compile_cache() is None
