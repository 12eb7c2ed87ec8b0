"""Bags of instance features for multiple-instance learning, and where they come from.

:func:`load_site` is the one entry: it returns a site's train/validation bags, whether the
site's data is the embedded synthetic default, a folder of labelled images, a folder of
prepared features or site files; :func:`detect_source` (in :mod:`common.data.sources`)
is the one place that tells those kinds apart. Modules: ``bags`` (containers, splits,
site files), ``labels`` (the labels reader and hospital assignment), ``sources``, and one
module per kind (``synthetic``, ``images``, ``h5``), none importing another.
"""

from common.data.bags import BagSet, SiteData, load_site_file, save_site_file
from common.data.sources import DataSource, detect_source, load_site

__all__ = ["BagSet", "DataSource", "SiteData", "detect_source", "load_site", "load_site_file",
           "save_site_file"]
