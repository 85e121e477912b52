"""Reports: an HTML page assembled from sections; plots and image grids embedded as PNG."""

from diffdissect.report.figures import bar_chart, heatmap, image_grid, png_bytes
from diffdissect.report.html import Report, Section

__all__ = ["Report", "Section", "bar_chart", "heatmap", "image_grid", "png_bytes"]
