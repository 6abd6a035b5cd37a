from setuptools import find_packages, setup

package_name = 'flake_core'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    package_data={package_name: ['calibration/*.json', 'calibration/LICENSE*']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='Flake scanner maintainers',
    maintainer_email='maintainers@flake-scanner.invalid',
    description='Materials vocabulary, geometry, optics, objectives, image conversion and node tools.',
    license='Apache-2.0',
    entry_points={'console_scripts': []},
)
