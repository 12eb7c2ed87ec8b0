"""Bags of instance features for multiple-instance learning, and where they come from.

:func:`load_site` is the one entry: it returns a site's train/validation bags, whether the
site's data is the embedded synthetic default, a folder of labelled images, or a site file.
"""

from common.data.bags import BagSet, SiteData, load_site, load_site_file, save_site_file

__all__ = ["BagSet", "SiteData", "load_site", "load_site_file", "save_site_file"]
