"""``autotune figure``: the paper's Figures 8a and 9a, one study per (system, request rate).

``rows`` computes what a figure shows from the studies alone (``FigureRow``,
the CSV, the comparison table); ``plot`` draws those rows (matplotlib);
``run`` runs or resumes the studies, side by side on the simulator.
"""

from autotune.figure.rows import (CSV_COLUMNS, IN_SCOPE, FigureData, FigureRow, check_figure, comparison_text,
                                  csv_text, default_rates, figure_data, figure_rows, parse_rates, parse_systems)
from autotune.figure.run import FigureRequest, run_figure

__all__ = ["CSV_COLUMNS", "IN_SCOPE", "FigureData", "FigureRequest", "FigureRow", "check_figure", "comparison_text",
           "csv_text", "default_rates", "figure_data", "figure_rows", "parse_rates", "parse_systems", "run_figure"]
