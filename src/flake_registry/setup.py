from setuptools import find_packages, setup

package_name = 'flake_registry'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    package_data={'flake_registry.web': ['templates/*.html', 'static/*']},
    include_package_data=True,
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='Flake scanner maintainers',
    maintainer_email='maintainers@flake-scanner.invalid',
    description='SQLite flake registry with the assembly robot services, export and a CLI.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'flake-registry = flake_registry.cli:main',
            'registry_node = flake_registry.nodes.registry_node:main',
            'flake-web = flake_registry.web.app:main',
            'flake-import = flake_registry.image_import:main',
        ],
    },
)
