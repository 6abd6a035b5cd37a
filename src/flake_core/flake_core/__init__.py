"""The foundation the scanner, detector and registry packages stand on (no rclpy at import)."""
