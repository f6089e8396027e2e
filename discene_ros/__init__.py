"""DiScene ROS 2 side: message conversions, the rclpy node and rosbag replay evaluation.

Importing this package needs no ROS install: rclpy, message packages, tf2_ros and cv_bridge are
imported lazily by the node; the conversions work on rosbags typestore messages as well.
"""
