"""Record, replay and offline evaluation of scans stored as rosbag2 bags."""
