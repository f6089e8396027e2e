"""DiScene ROS 2 side: message conversions (``msg_decode``, ``msg_encode``), the rclpy node and rosbag replay evaluation.

Importing this package needs no ROS install: the node module imports rclpy, the message packages
and tf2_ros only where they exist (``node.ROS_IMPORT_ERROR`` otherwise), cv_bridge lazily; the
conversions work on rosbags typestore messages as well.
"""
