"""``autotune figure``: the paper's Figures 8a, 9a, 10, 12 and 13 from the tuner.

``rows`` computes what a figure shows from the studies alone (``FigureRow``
per study, ``TrialPoint`` per trial, the CSV, the text); ``plot`` draws them
(matplotlib); ``run`` runs or resumes the studies, side by side on the
simulator.
"""

from autotune.figure.rows import (CSV_COLUMNS, IN_SCOPE, FigureData, FigureRow, TrialPoint, check_figure,
                                  comparison_text, csv_text, default_rates, figure_csv_text, figure_data,
                                  figure_rows, figure_text, parse_choices, parse_ints, parse_rates, parse_systems)
from autotune.figure.run import FigureRequest, run_figure

__all__ = ["CSV_COLUMNS", "IN_SCOPE", "FigureData", "FigureRequest", "FigureRow", "TrialPoint", "check_figure",
           "comparison_text", "csv_text", "default_rates", "figure_csv_text", "figure_data", "figure_rows",
           "figure_text", "parse_choices", "parse_ints", "parse_rates", "parse_systems", "run_figure"]
