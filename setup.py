"""Packaging layout only (metadata lives in pyproject.toml).

The repository keeps ``orchestrator/``, ``kvm/``, ``xen/`` and ``hooks/`` side by side,
but the installed distribution holds one namespace: ``kvm/`` installs as
``orchestrator.kvm``, ``xen/`` as ``orchestrator.xen``, ``hooks/`` as
``orchestrator.hooks``. ``bench/`` is not installed (it runs from a checkout). Packages
are discovered, so a new sub-package under any of the four roots needs no edit here.
"""

from setuptools import find_packages, setup

MAPPED = {"kvm": "orchestrator.kvm", "xen": "orchestrator.xen", "hooks": "orchestrator.hooks"}

packages = find_packages(include=["orchestrator", "orchestrator.*"])
for top, installed in MAPPED.items():
    packages += [installed + sub[len(top):] for sub in find_packages(include=[top, top + ".*"])]

setup(packages=packages, package_dir=dict((v, k) for k, v in MAPPED.items()))
