"""Adapter residency: from a resolved version to an adapter the engine has accepted.

Three tiers, each an LRU the gateway owns: engine batch slots and engine memory
(``manager``), and verified files on local disk (``disk_cache``), in front of the
registry's store. A new cache tier goes here, as a step of ``AdapterManager._make_ready``
and a ``Tier`` name the metrics and the tier header report."""
