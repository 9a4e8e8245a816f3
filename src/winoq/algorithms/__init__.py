"""Calibration algorithms beside the data-free transform scales: the PAW+FSQ baseline."""
