"""ROS 2 adapter of the registration engine: message conversions, buffers and the node.

Only :mod:`.conversions`, :mod:`.params`, :mod:`.tf_publisher` and :mod:`.node` import ROS
packages; :mod:`.sync`, :mod:`.joint_buffer`, :mod:`.initializer`, :mod:`.pipeline` and
:mod:`.worker` are plain Python/PyTorch and are tested without DDS.
"""
