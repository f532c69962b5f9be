"""Data: calibration sources, the generated detection data set, COCO evaluation."""
