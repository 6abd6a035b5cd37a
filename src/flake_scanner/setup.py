from glob import glob

from setuptools import find_packages, setup

package_name = 'flake_scanner'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/config', glob('../../config/*')),
        ('share/' + package_name + '/launch', glob('../../launch/*.py')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='Flake scanner maintainers',
    maintainer_email='maintainers@flake-scanner.invalid',
    description='Stage, camera, autofocus, tiler, scan coordinator and the simulated microscope.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'flake-sim = flake_scanner.sim.cli:main',
            'flake-system = flake_scanner.system:main',
            'flake-demo = flake_scanner.demo.run:main',
            'flake-record = flake_scanner.bag.record:main',
            'flake-replay = flake_scanner.bag.replay:main',
            'stage_node = flake_scanner.nodes.stage_node:main',
            'camera_node = flake_scanner.nodes.camera_node:main',
            'autofocus_node = flake_scanner.nodes.autofocus_node:main',
            'tiler_node = flake_scanner.nodes.tiler_node:main',
            'scan_coordinator = flake_scanner.nodes.scan_coordinator:main',
            'stage_emulator = flake_scanner.stage.emulator:main',
        ],
    },
)
